"""The vLLM engine: one `AsyncLLM` running the model under one RoPE configuration.

vLLM types stay inside this module; callers see `RowRequest` in and `EngineStep` out.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from server.engines.base import EngineStats, EngineStep, FinishReason, RowRequest, SamplingOptions, TokenEvent
from strategies.base import ModelFacts, RopeConfig

log = logging.getLogger(__name__)

# Called with (engine, vLLM FinishedRequestStats) for every finished request, and with the
# latest scheduler stats; the metrics room subscribes, the engine stays ignorant of Prometheus.
StatsListener = Callable[["VllmEngine", Any, Any], None]


@dataclass(frozen=True)
class VllmEngineConfig:
    model: str
    dtype: str = "auto"
    max_num_seqs: int = 64
    max_num_batched_tokens: int | None = None
    enforce_eager: bool = True
    kv_cache_gib: int = 2
    gpu_memory_utilization: float = 0.85
    enable_prefix_caching: bool = True
    logits_processors: tuple[str, ...] = ()
    served_model_name: str | None = None


def is_cpu_build() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


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


# vLLM rope types whose cos/sin table (and derived max_model_len) is max_position_embeddings x factor.
TABLE_TIMES_FACTOR_ROPE_TYPES = ("linear", "dynamic", "ntk")


def hf_overrides_for(rope: RopeConfig, model: ModelFacts) -> dict[str, Any] | None:
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


def _to_vllm_sampling(options: SamplingOptions) -> Any:
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
        output_kind=RequestOutputKind.DELTA,
        extra_args=options.extra_args,
        skip_special_tokens=True,
    )


def _tokens_prompt(row: RowRequest) -> Any:
    from vllm.inputs import TokensPrompt

    prompt = TokensPrompt(prompt_token_ids=row.prompt_token_ids)
    if row.cache_salt:
        prompt["cache_salt"] = row.cache_salt
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


def _silent_prometheus_logger() -> type:
    """A `PrometheusStatLogger` that registers and records nothing.

    vLLM appends its Prometheus logger to the stat loggers unless one of them already is one; ours
    (server/metrics.py) exports what we need under `ropeserve_` names, so vLLM's stays off.
    """
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    class _SilentPrometheusStatLogger(PrometheusStatLogger):
        def __init__(self, vllm_config: Any, engine_indexes: list[int] | None = None) -> None:
            self.engine_indexes = engine_indexes or [0]

        def record(self, *args: Any, **kwargs: Any) -> None:
            pass

        def record_sleep_state(self, *args: Any, **kwargs: Any) -> None:
            pass

        def record_admission_rejection(self, *args: Any, **kwargs: Any) -> None:
            pass

        def log_engine_initialized(self) -> None:
            pass

        def log(self) -> None:
            pass

    return _SilentPrometheusStatLogger


class VllmEngine:
    kind = "vllm"

    def __init__(
        self,
        config: VllmEngineConfig,
        rope: RopeConfig,
        model: ModelFacts,
        stats_listener: StatsListener | None = None,
    ) -> None:
        self.config = config
        self.rope = rope
        self.model = model
        self.stats_listener = stats_listener
        self._llm: Any = None
        self._tokenizer: Any = None
        self._special_ids: frozenset[int] = frozenset()
        self._scheduler_stats: Any = None
        self._group_lock: Any = None  # asyncio.Lock, made on first use (NBCE row groups)
        self.started_at: float | None = None
        self.startup_seconds: float | None = None
        self.last_used = time.monotonic()

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Build the AsyncLLM (blocking: tens of seconds). Call from a worker thread if needed."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        started = time.monotonic()
        if is_cpu_build():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.config.kv_cache_gib))
        max_len = self.rope.max_model_len or self.model.native_window
        optional: dict[str, Any] = {}
        if (overrides := hf_overrides_for(self.rope, self.model)) is not None:
            optional["hf_overrides"] = overrides
        if self.config.logits_processors:
            optional["logits_processors"] = list(self.config.logits_processors)
        args = AsyncEngineArgs(
            model=self.config.model,
            served_model_name=self.config.served_model_name,
            dtype=self.config.dtype,
            max_model_len=max_len,
            max_num_seqs=self.config.max_num_seqs,
            max_num_batched_tokens=self.config.max_num_batched_tokens,
            enforce_eager=self.config.enforce_eager,
            gpu_memory_utilization=self.config.gpu_memory_utilization,
            enable_prefix_caching=self.config.enable_prefix_caching,
            disable_log_stats=True,
            **optional,
        )
        # Our collector feeds the stats listener. vLLM adds its own Prometheus logger (metric names
        # with colons, in prometheus_client's global registry) unless one is given: give a silent one.
        stat_loggers = [self._stat_logger_factory(), _silent_prometheus_logger()]
        self._llm = AsyncLLM.from_engine_args(args, stat_loggers=stat_loggers)
        self._tokenizer = self._llm.get_tokenizer()
        self._special_ids = frozenset(getattr(self._tokenizer, "all_special_ids", ()) or ())
        self.startup_seconds = time.monotonic() - started
        self.started_at = time.time()
        log.info("engine %s started in %.1f s", self.rope.key(), self.startup_seconds)

    def shutdown(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None

    def _stat_logger_factory(self) -> Callable[..., Any]:
        from vllm.v1.metrics.loggers import StatLoggerBase

        engine = self

        class _Collector(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):  # type: ignore[no-untyped-def]
                if scheduler_stats is not None:
                    engine._scheduler_stats = scheduler_stats
                if engine.stats_listener is not None:
                    engine.stats_listener(engine, scheduler_stats, iteration_stats)

            def log_engine_initialized(self) -> None:
                pass

        return _Collector

    # --- requests ------------------------------------------------------------------------------

    @property
    def dtype(self) -> str:
        """The dtype the engine actually runs in (e.g. "float32"), once started."""
        if self._llm is None:
            return self.config.dtype
        return str(self._llm.model_config.dtype).removeprefix("torch.")

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    async def generate(self, row: RowRequest) -> AsyncIterator[EngineStep]:
        self.last_used = time.monotonic()
        # AsyncLLM aborts the engine request itself when this generator is closed early.
        async for output in self._llm.generate(_tokens_prompt(row), _to_vllm_sampling(row.sampling), row.request_id):
            yield self._step(output, row)
        self.last_used = time.monotonic()

    def _step(self, output: Any, row: RowRequest) -> EngineStep:
        completion = output.outputs[0]
        return EngineStep(
            tokens=self._token_events(completion),
            text=completion.text,
            finished=output.finished,
            finish_reason=_finish_reason(completion) if output.finished else None,
            prompt_tokens=len(row.prompt_token_ids),
        )

    async def generate_group(self, rows: list[RowRequest]) -> list[AsyncIterator[EngineStep]]:
        """Admit several rows so that the scheduler sees them in one step (NBCE's lockstep rows).

        The scheduler is paused ("keep": running requests stay, nothing is stepped) for the few
        milliseconds it takes to add the rows, then resumed; the rows enter the waiting queue
        together. Returns one step stream per row; closing a stream aborts its row.
        """
        import asyncio

        self.last_used = time.monotonic()
        if self._group_lock is None:
            self._group_lock = asyncio.Lock()
        queues: list[Any] = []
        async with self._group_lock:
            core = self._llm.engine_core
            paused = False
            try:
                await core.pause_scheduler_async(mode="keep", clear_cache=False)
                paused = True
            except Exception:  # an engine without pause: the rows are still sent back to back
                log.debug("could not pause the scheduler for a row group", exc_info=True)
            try:
                for row in rows:
                    sampling = _to_vllm_sampling(row.sampling)
                    queues.append(await self._llm.add_request(row.request_id, _tokens_prompt(row), sampling))
            except BaseException:
                await asyncio.shield(self._llm.abort([r.request_id for r in rows]))
                raise
            finally:
                if paused:
                    await asyncio.shield(core.resume_scheduler_async())
        return [self._follow(queue, row) for queue, row in zip(queues, rows)]

    async def _follow(self, queue: Any, row: RowRequest) -> AsyncIterator[EngineStep]:
        from vllm.outputs import STREAM_FINISHED

        try:
            finished = False
            while not finished:
                output = queue.get_nowait() or await queue.get()
                finished = output.finished
                if output is STREAM_FINISHED:
                    break
                yield self._step(output, row)
        except BaseException:  # closed early (GeneratorExit), cancelled, or failed: free the row
            import asyncio

            await asyncio.shield(self._llm.abort(row.request_id))
            raise
        finally:
            queue.close()
            self.last_used = time.monotonic()

    def _token_events(self, completion: Any) -> list[TokenEvent]:
        events = []
        logprobs = completion.logprobs or []
        for i, token_id in enumerate(completion.token_ids):
            entry = logprobs[i].get(token_id) if i < len(logprobs) else None
            text = entry.decoded_token if entry is not None and entry.decoded_token is not None else None
            if text is None:
                text = self._tokenizer.decode([token_id])
            events.append(
                TokenEvent(
                    id=int(token_id),
                    text=text,
                    logprob=float(entry.logprob) if entry is not None else None,
                    special=token_id in self._special_ids,
                )
            )
        return events

    async def abort(self, request_ids: list[str]) -> None:
        if self._llm is not None and request_ids:
            await self._llm.abort(request_ids)

    async def check_health(self) -> None:
        await self._llm.check_health()

    def stats(self) -> EngineStats:
        s = self._scheduler_stats
        if s is None:
            return EngineStats()
        return EngineStats(
            kv_cache_usage=float(s.kv_cache_usage),
            running_requests=int(s.num_running_reqs),
            waiting_requests=int(s.num_waiting_reqs),
        )
