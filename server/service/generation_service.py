"""Between HTTP and engines: resolve the strategy, plan, run the plan, account for it.

The HTTP layer hands in plain values (a `JobDraft`) and gets `EngineStep`s back; it never sees
RoPE or vLLM. A request's strategy is resolved, planned and refused once, here (`plan_job`).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from server.engines.base import Engine, LockstepCombiner, RowRequest, SamplingOptions, StepStream, Tokenizer
from server.ops.metrics import UNKNOWN_STRATEGY, Metrics
from server.ops.watchdog import watch_engine
from server.plan import ModelFacts, StrategyError, StrategySpec
from server.service.admission import AdmissionController, default_priority
from server.service.capacity import capacity_refusal
from server.service.jobs import Job, within_deadline
from server.service.lockstep import run_lockstep
from server.service.plan_checks import check_plan, check_token_ids, first_served
from server.service.prompt_tokens import PromptTokenizer
from server.service.queue_admission import job_work, queue_refusal
from server.service.refusal import Refusal
from server.service.request_record import RequestRecord, failure_status, record_refusal
from server.structured.compile_check import ConstraintCheck, refuse_unchecked
from strategies.base import PlanContext, PromptTokens, Strategy, StrategyRequest
from strategies.registry import StrategyRegistry

# Texts this long are tokenized off the event loop so other requests keep streaming; token-id
# lists this long are decoded off it.
TOKENIZE_IN_THREAD_CHARS = 20_000
DECODE_IN_THREAD_IDS = 5_000


@dataclass(frozen=True)
class JobDraft:
    """One generation request in plain values, whatever route it came by."""

    # The prompt's text, or its token ids (then no documents).
    prompt: str | list[int]
    documents: tuple[str, ...]
    sampling: SamplingOptions
    strategy: StrategySpec | None
    # The client's deadline in seconds; the server's `request_timeout_s` caps it.
    deadline_s: float | None = None
    # The client's scheduling priority (vLLM's: lower is earlier); None: short before long.
    priority: int | None = None


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
        admission: AdmissionController | None = None,
        constraint_check: ConstraintCheck | None = None,
    ) -> None:
        self.engine = engine
        # Compiles each structured-output constraint before its request runs (None: none are served).
        self.constraint_check = constraint_check
        # Admission by queued work (server/service/admission.py); without one, a bound of 0: never refuses.
        self.admission = admission or AdmissionController(0, max_rows=engine.max_rows_per_step)
        # Server-side configuration strategies read while planning (PlanContext.options).
        self.strategy_options = dict(strategy_options or {})
        self.registry = registry
        self.tokenizer = tokenizer
        # What planning reads: a request's ids, tokenized before it is planned.
        self.prompt_tokenizer = PromptTokenizer(tokenizer)
        self.metrics = metrics
        self.default_strategy = default_strategy
        self.max_concurrent_requests = max_concurrent_requests
        # False where seeded sampling would crash the engine (server/service/plan_checks.py: check_plan).
        self.engine_seeds = engine_seeds
        self.request_timeout_s = request_timeout_s
        # Builds and starts a new engine: the watchdog replaces a dead engine with one.
        self.engine_factory = engine_factory
        self.restarting = False
        # Set on SIGTERM (server/ops/drain.py): requests in flight finish, new ones are refused.
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

    async def tokenize_text(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The tokenizer's ids of `text`, off the event loop for a long text."""
        if len(text) >= TOKENIZE_IN_THREAD_CHARS:
            return await asyncio.to_thread(self._encode, text, add_special_tokens)
        return self._encode(text, add_special_tokens)

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        # By keyword: a Hugging Face tokenizer's second positional parameter is `text_pair`.
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    async def decode(self, ids: list[int]) -> str:
        """The text of token ids, off the event loop for a long list."""
        if len(ids) >= DECODE_IN_THREAD_IDS:
            return await asyncio.to_thread(self.tokenizer.decode, ids)
        return self.tokenizer.decode(ids)

    @staticmethod
    def plain_prompt(inputs: str, documents: tuple[str, ...]) -> str:
        """The text the plain strategies read (docs/CONTRACT.md): documents, blank line, inputs."""
        return StrategyRequest(inputs=inputs, documents=documents).plain_prompt()

    async def last_prompt_tokens(self, inputs: str, documents: tuple[str, ...], keep: int) -> list[int] | None:
        """TGI's `truncate`: the last `keep` tokens of the prompt the model reads; None when it
        holds no more than that (nothing to cut)."""
        ids = await self.tokenize_text(self.plain_prompt(inputs, documents))
        return ids[-keep:] if len(ids) > keep else None

    def resolve_strategy(self, spec: StrategySpec | None) -> Strategy[Any]:
        return self.registry.resolve(spec, self.default_strategy)

    def plan_context(self) -> PlanContext:
        return PlanContext(
            model=self.model,
            registry=self.registry,
            options=self.strategy_options,
            max_rows=self.engine.max_rows_per_step,
        )

    async def prompt_tokens(self, request: StrategyRequest) -> PromptTokens:
        """The token ids `request`'s planning reads, tokenized off the event loop for long texts."""
        ids = None if request.token_ids is None else list(request.token_ids)
        texts = (request.inputs, request.documents, ids)
        if ids is None and len(request.inputs) + sum(map(len, request.documents)) >= TOKENIZE_IN_THREAD_CHARS:
            return await asyncio.to_thread(self.prompt_tokenizer.tokens, *texts)
        return self.prompt_tokenizer.tokens(*texts)

    async def plan_job(self, draft: JobDraft) -> Job:
        """Resolve, tokenize, plan and check a request; raises StrategyError (422) before any engine work."""
        arrived = time.perf_counter()
        strategy = self.resolve_strategy(draft.strategy)
        ids = draft.prompt if isinstance(draft.prompt, list) else None
        if ids is not None:  # before decoding them
            max_new = draft.sampling.max_new_tokens
            check_token_ids(ids, draft.documents, self.model.vocab_size, max_new, self.model.max_context_tokens)
        request = StrategyRequest(
            inputs=str(draft.prompt) if ids is None else await self.decode(ids),
            documents=draft.documents,
            max_new_tokens=draft.sampling.max_new_tokens,
            token_ids=None if ids is None else tuple(ids),
            scoring=draft.sampling.prompt_logprobs is not None,
        )
        context = self.plan_context()
        read = strategy.prompt_texts(request, context)
        # Planning is a function of values (no tokenizer, no engine): cheap, so it runs inline.
        planned = strategy.plan(replace(read, tokens=await self.prompt_tokens(read)), context)
        plan = first_served(planned, self.engine.refuse_rope)
        check_plan(plan, strategy.name, draft.sampling, self.engine, self.engine_seeds)
        if (constraint := draft.sampling.constraint) is not None:
            await (self.constraint_check or refuse_unchecked).check(constraint)
        limits = [s for s in (draft.deadline_s, self.request_timeout_s) if s is not None]
        deadline = min(limits) if limits else None
        priority = default_priority(plan.prompt_tokens, draft.priority)
        return Job(
            uuid.uuid4().hex, strategy, plan, draft.sampling, arrived, request, deadline_s=deadline, priority=priority
        )

    async def prepare(self, draft: JobDraft) -> Job:
        """`plan_job`, with a refused request counted as `invalid` in the metrics."""
        try:
            return await self.plan_job(draft)
        except StrategyError:
            self.metrics.requests.labels(self._strategy_label(draft.strategy), "invalid").inc()
            raise

    async def watch_engine(self, interval_s: float = 1.0, max_backoff_s: float = 60.0) -> None:
        """Replace a dead engine for the server's life (server/ops/watchdog.py); without a factory, nothing."""
        if self.engine_factory is not None:
            await watch_engine(self, self.engine_factory, interval_s, max_backoff_s)

    def _strategy_label(self, spec: StrategySpec | None) -> str:
        """The metrics label of a request's strategy: a registered name, never raw client input."""
        name = spec.get("name") if isinstance(spec, dict) else spec
        if name is None:
            name = self.default_strategy
        return name if isinstance(name, str) and name in self.registry.names() else UNKNOWN_STRATEGY

    def refresh_gauges(self) -> None:
        """Called at scrape time: the engine's gauges (vLLM's listener keeps them current between
        scrapes; this also covers engines without one) and admission's figures."""
        self.metrics.refresh_engine(self.engine)
        self.metrics.refresh_admission(self.admission.figures())

    def capacity_refusal(self, job: Job) -> Refusal | None:
        """Why `job` cannot start now (None: it can); nothing counted (a dry run asks this)."""
        return capacity_refusal(self, job.plan.rope) or queue_refusal(self.admission, job)

    def check_capacity(self, job: Job) -> None:
        """Raises the job's Refusal (429/503) when it cannot start now; counted and logged."""
        if (refusal := self.capacity_refusal(job)) is not None:
            record_refusal(self.metrics, job, refusal.reason)
            raise refusal

    async def run(self, job: Job) -> StepStream:
        """Run a prepared job, yielding new tokens as they come; records metrics and the access log."""
        # The routes checked before their response started (a stream's 429 is a real status line);
        # this is the check that admits: requests started since then may have filled the server.
        # Checked and tracked with no await between: no other request can take its place meanwhile.
        self.check_capacity(job)
        self.admission.admit(job.request_id, job_work(job))
        self._active += 1
        record = RequestRecord(self.metrics, job)
        status = "error"
        try:
            async for step in within_deadline(self._steps(job), job.deadline_at):
                record.observe(step)
                if step.tokens:
                    self.admission.generated(job.request_id, len(step.tokens))
                yield step
            status = "success"
        except BaseException as exc:
            status = failure_status(exc)
            raise
        finally:
            self._active -= 1
            self.admission.finish(job.request_id)
            record.finish(status)

    def _steps(self, job: Job) -> StepStream:
        """The plan's own kind picks how it runs: one row, rows in lockstep, or a combiner's own run."""
        combiner = job.plan.combiner
        if isinstance(combiner, LockstepCombiner):
            return run_lockstep(self.engine, job, combiner)
        if combiner is not None:
            return combiner.run(self.engine, job)
        row = RowRequest(job.request_id, job.plan.rows[0], job.sampling, job.plan.rope, job.priority)
        return self.engine.generate(row)
