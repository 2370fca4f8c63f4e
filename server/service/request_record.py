"""One request's account: its metrics while it runs, and its line in the access log when it ends."""

from __future__ import annotations

import asyncio
import logging
import time

from server.engines.base import EngineBusy, EngineStep, FinishReason
from server.ops.metrics import Metrics
from server.service.jobs import DeadlineExceeded, Job

log = logging.getLogger("ropeserve.access")


# The `status` label of each way a running request can end early, one row a kind of failure
# (subclasses included); a failure of no listed kind is "error". Every label is one of the
# counter's REQUEST_STATUSES, so the series a dashboard reads exist from the first scrape.
FAILURE_STATUSES: tuple[tuple[type[BaseException], str], ...] = (
    # The client went away: the route's task was cancelled or its stream closed.
    (asyncio.CancelledError, "cancelled"),
    (GeneratorExit, "cancelled"),
    # The engine could not take a row after admission: the client gets the same 429 as a refusal.
    (EngineBusy, "overloaded"),
    (DeadlineExceeded, "timeout"),
)


def failure_status(exc: BaseException) -> str:
    """The `status` label of a request that ended with `exc`.

    >>> failure_status(DeadlineExceeded("past its deadline")), failure_status(ValueError("bad"))
    ('timeout', 'error')
    """
    return next((status for kind, status in FAILURE_STATUSES if isinstance(exc, kind)), "error")


def log_request(
    job: Job,
    status: str,
    finish_reason: str | None,
    generated: int,
    ttft: float | None,
    duration: float,
    kv_tokens: int | None = None,
) -> None:
    """One JSON line on `ropeserve.access` (server/ops/logging_setup.py): ids, strategy, tokens, timings."""
    tpot = None
    if ttft is not None and generated > 1:
        tpot = round((duration - ttft) / (generated - 1), 6)
    log.info(
        "request",
        extra={
            "access": {
                "request_id": job.request_id,
                "strategy": job.strategy_name,
                "status": status,
                "finish_reason": finish_reason,
                "rows": len(job.plan.rows),
                "prompt_tokens": job.plan.prompt_tokens,
                "generated_tokens": generated,
                "max_new_tokens": job.sampling.max_new_tokens,
                "kv_tokens": kv_tokens,
                "ttft_s": None if ttft is None else round(ttft, 6),
                "time_per_output_token_s": tpot,
                "duration_s": round(duration, 6),
            }
        },
    )


def record_refusal(metrics: Metrics, job: Job, reason: str) -> None:
    """A job refused for capacity (429/503): counted as `overloaded`, and by `reason`, and logged."""
    metrics.requests.labels(job.strategy_name, "overloaded").inc()
    metrics.admission.refusals.labels(reason).inc()
    log_request(job, "overloaded", None, 0, None, time.perf_counter() - job.arrived)


class RequestRecord:
    """The metrics of one running job: in flight from creation, each step's latencies as it comes,
    and the totals and access-log line at `finish`."""

    def __init__(self, metrics: Metrics, job: Job) -> None:
        self.metrics = metrics
        self.job = job
        self.generated = 0
        self.first_at: float | None = None
        self.last_at = 0.0
        self.finish_reason: FinishReason | None = None
        metrics.requests_in_flight.labels(job.strategy_name).inc()
        metrics.track_request(job.request_id, job.strategy_name)

    def observe(self, step: EngineStep) -> None:
        now, name, count = time.perf_counter(), self.job.strategy_name, len(step.tokens)
        if count:
            if self.first_at is None:
                self.first_at = now
                self.metrics.time_to_first_token.labels(name).observe(now - self.job.arrived)
                # Tokens that arrive together beyond the first share the wait since it.
                gaps, previous = count - 1, now
            else:
                gaps, previous = count, self.last_at
            for _ in range(gaps):
                self.metrics.inter_token_latency.labels(name).observe((now - previous) / count)
            self.last_at = now
        self.generated += count
        if step.finished:
            self.finish_reason = step.finish_reason

    def finish(self, status: str) -> None:
        m, job, name = self.metrics, self.job, self.job.strategy_name
        m.requests_in_flight.labels(name).dec()
        duration = time.perf_counter() - job.arrived
        m.requests.labels(name, status).inc()
        m.request_duration.labels(name).observe(duration)
        m.prompt_tokens.labels(name).inc(job.plan.prompt_tokens)
        m.generated_tokens.labels(name).inc(self.generated)
        kv_tokens = job.stats.get("kv_tokens", job.plan.prompt_tokens + self.generated * len(job.plan.rows))
        m.request_kv_tokens.labels(name).observe(kv_tokens)
        ttft = None if self.first_at is None else self.first_at - job.arrived
        log_request(job, status, self.finish_reason, self.generated, ttft, duration, kv_tokens)
