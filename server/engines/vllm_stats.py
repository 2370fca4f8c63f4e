"""What vLLM measures per iteration, passed on as the engine API's `EngineIteration`.

vLLM hands its `SchedulerStats` and `IterationStats` to the stat loggers it is started with;
ours (`IterationRecorder.vllm_logger`) keeps the scheduler's latest figures for `Engine.stats()`
and tells the engine's stats listener (the metrics room), which never sees vLLM's types.
"""

from __future__ import annotations

import logging
from typing import Any

from server.engines.base import Engine, EngineIteration, FinishedRow, StatsListener, StepWork

log = logging.getLogger(__name__)


def iteration_from_vllm(scheduler_stats: Any, iteration_stats: Any) -> EngineIteration:
    """vLLM's per-iteration `SchedulerStats` and `IterationStats` (either may be None) as the
    engine API's `EngineIteration`."""
    finished = tuple(
        finished_row(f)
        for f in (iteration_stats.finished_requests if iteration_stats is not None else ())
        if f.request_id is not None
    )
    preempted = int(iteration_stats.num_preempted_reqs) if iteration_stats is not None else 0
    if scheduler_stats is None:
        return EngineIteration(preempted_rows=preempted, finished=finished)
    return EngineIteration(
        kv_cache_usage=float(scheduler_stats.kv_cache_usage),
        running_requests=int(scheduler_stats.num_running_reqs),
        waiting_requests=int(scheduler_stats.num_waiting_reqs),
        preempted_rows=preempted,
        finished=finished,
        step=step_from_vllm(getattr(scheduler_stats, "iteration_details", None)),
    )


def finished_row(stats: Any) -> FinishedRow:
    """vLLM's `FinishedRequestStats` of one row as a `FinishedRow`. vLLM counts a row's prefix-cache
    hits (`num_cached_tokens`) when its prefill is scheduled; a row preempted and recomputed keeps
    the first count."""
    return FinishedRow(
        str(stats.request_id),
        max(0.0, float(stats.queued_time)),
        max(0.0, float(stats.prefill_time)),
        prompt_tokens=max(0, int(getattr(stats, "num_prompt_tokens", 0) or 0)),
        cached_tokens=max(0, int(getattr(stats, "num_cached_tokens", 0) or 0)),
    )


def step_from_vllm(details: Any) -> StepWork | None:
    """vLLM's `SchedulerIterationDetails` (sent with `enable_logging_iteration_details`) as a
    `StepWork`; None without details, or for a data-parallel dummy step (no work of ours).

    vLLM counts a request as "context" while it has no output token: its tokens in the step are
    prefill (a chunk of its prompt); the others' are decode tokens."""
    if details is None or getattr(details, "is_dummy", False):
        return None
    return StepWork(
        prefill_tokens=int(details.num_ctx_tokens),
        decode_tokens=int(details.num_generation_tokens),
        seconds=max(0.0, float(details.elapsed_ms) / 1000),
    )


class IterationRecorder:
    """Keeps the latest iteration that carried the scheduler's figures (`Engine.stats()` between
    scrapes) and tells the listener of every iteration."""

    def __init__(self, engine: Engine, listener: StatsListener | None) -> None:
        self.engine = engine
        self.listener = listener
        self.last = EngineIteration()

    def record(self, iteration: EngineIteration) -> None:
        """After every vLLM iteration, on the event loop."""
        if iteration.kv_cache_usage is not None:
            self.last = iteration
        if self.listener is not None:
            try:
                self.listener(self.engine, iteration)
            except Exception:  # a listener's bug must not break vLLM's output loop
                log.exception("engine stats listener failed")

    def vllm_logger(self) -> type:
        """A vLLM stat-logger class that records every iteration here."""
        from server.engines.vllm_adapter.engine import recording_stat_logger

        def record(scheduler_stats: Any, iteration_stats: Any) -> None:
            self.record(iteration_from_vllm(scheduler_stats, iteration_stats))

        return recording_stat_logger(record)
