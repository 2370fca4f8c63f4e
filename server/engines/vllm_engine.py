"""The vLLM engine: one `AsyncLLM` that serves rows under any RoPE configuration.

Every row names its RoPE configuration (`RowRequest.rope`); the engine gives the configuration a
slot of the model's cos/sin table (`RopeSlots`, server/engines/rope_slots.py) and tells the
engine core through the row's `extra_args`; the engine core's runner rotates the row with that
slot (server/engines/multi_rope/). One copy of the weights, one KV cache, one continuous batch.

`fixed_rope` instead starts a plain vLLM engine under one configuration (through vLLM's
`hf_overrides`), which serves rows of that configuration only: the reference the exactness tests
compare with, and the fallback for model architectures the slot table does not cover.

`VllmEngine` coordinates the rooms that do the work, each beside this file:

- vllm_config.py: the engine's settings and the model's facts;
- vllm_launch.py: the host prepared for the ranks, vLLM's engine arguments;
- vllm_refusal.py, vllm_admission.py: which rows are refused, and admitted rows as vLLM inputs;
- vllm_outputs.py: vLLM's outputs as `EngineStep`s;
- vllm_groups.py: rows admitted in one scheduler step (NBCE's lockstep rows);
- vllm_stats.py: vLLM's per-iteration stats for the stats listener and `stats()`.

vLLM types stay inside these modules; callers see `RowRequest` in and `EngineStep` out.
"""

from __future__ import annotations

import logging
import subprocess
import time
from typing import Any

from server.engines.base import (
    EngineDown,
    EngineIteration,
    EngineStats,
    Parallelism,
    RowRequest,
    StatsListener,
    StepStream,
)
from server.engines.cpu_ray import stop_local_ray
from server.engines.rope_slots import RopeSlots
from server.engines.vllm_admission import RowAdmission
from server.engines.vllm_config import VllmEngineConfig, is_cpu_build, read_model_facts
from server.engines.vllm_groups import RowGroups
from server.engines.vllm_launch import engine_args, prepare_host
from server.engines.vllm_outputs import OutputReader
from server.engines.vllm_stats import IterationRecorder
from server.plan import ModelFacts, RopeConfig

# The engine's settings and facts are imported from here by its builders (server/bootstrap.py, tests).
__all__ = ["VllmEngine", "VllmEngineConfig", "is_cpu_build", "read_model_facts"]

log = logging.getLogger(__name__)


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
        self.admission = RowAdmission(config, model)
        self.iterations = IterationRecorder(self, stats_listener)
        self.startup_seconds: float | None = None
        self._llm: Any = None
        self._outputs: OutputReader | None = None
        self._groups: RowGroups | None = None
        # The local Ray instance start() started (the CPU build's `ray` backend), if any.
        self._ray_holder: subprocess.Popen[str] | None = None
        # The engine-core processes vLLM started (server/engines/vllm_adapter/engine.py), polled by `alive`.
        self._core_processes: list[Any] = []

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Build the AsyncLLM (blocking: tens of seconds). Call from a worker thread if needed."""
        from server.engines.vllm_adapter.engine import (
            AsyncLLM,
            engine_core_processes,
            memoize_logprob_token_texts,
            silent_prometheus_logger,
        )

        started = time.monotonic()
        # Logprob texts are made on the API's event loop: each token id decoded once (the adapter's doc).
        memoize_logprob_token_texts()
        cpu = is_cpu_build()
        self._ray_holder = prepare_host(self.config, cpu)
        # Our recorder feeds the stats listener. vLLM adds its own Prometheus logger (metric names
        # with colons, in prometheus_client's global registry) unless one is given: give a silent one.
        stat_loggers = [self.iterations.vllm_logger(), silent_prometheus_logger()]
        self._llm = AsyncLLM.from_engine_args(engine_args(self.config, self.model, cpu), stat_loggers=stat_loggers)
        self._core_processes = engine_core_processes(self._llm)
        self._outputs = OutputReader(self._llm.get_tokenizer())
        self._groups = RowGroups(self._llm, self.admission, self._outputs)
        self.admission.refusal.engine_started(self._llm.vllm_config)
        self.startup_seconds = time.monotonic() - started
        log.info("engine started in %.1f s (%s)", self.startup_seconds, self.config.describe_rope())

    def shutdown(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None
            self._groups = None
            log.info("engine stopped")
        if self._ray_holder is not None:
            stop_local_ray(self._ray_holder)
            self._ray_holder = None

    def record_iteration(self, iteration: EngineIteration) -> None:
        """After every vLLM iteration (on the event loop): keep the scheduler's figures, tell the listener."""
        self.iterations.record(iteration)

    # --- facts ---------------------------------------------------------------------------------

    @property
    def slots(self) -> RopeSlots:
        """The RoPE slots rows hold (`RopeSlots`)."""
        return self.admission.slots

    @property
    def alive(self) -> bool:
        """The engine runs: vLLM has not flagged it dead, and no engine-core process has exited
        (polled directly: it is seen within a system call of its death, vLLM's flag can lag)."""
        if self._llm is None or self._llm.errored:
            return False
        return all(process.is_alive() for process in self._core_processes)

    @property
    def dtype(self) -> str:
        """The dtype the engine actually runs in (e.g. "float32"), once started."""
        if self._llm is None:
            return self.config.dtype
        return str(self._llm.model_config.dtype).removeprefix("torch.")

    @property
    def tokenizer(self) -> Any:
        return self._outputs.tokenizer if self._outputs is not None else None

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
        return self.admission.refuse(rope)

    def can_admit(self, rope: RopeConfig) -> bool:
        return self.admission.can_admit(rope)

    def stats(self) -> EngineStats:
        last, slots = self.iterations.last, self.admission.slots
        return EngineStats(
            kv_cache_usage=last.kv_cache_usage or 0.0,
            running_requests=last.running_requests or 0,
            waiting_requests=last.waiting_requests or 0,
            rope_slots_in_use=slots.in_use(),
            rope_slots=slots.slots - 1,
            rope_slot_loads=slots.loads,
        )

    # --- requests ------------------------------------------------------------------------------

    async def generate(self, row: RowRequest) -> StepStream:
        from server.engines.vllm_adapter.engine import EngineDeadError

        if not self.alive or (outputs := self._outputs) is None:
            raise EngineDown("the engine is down; it is being restarted, retry later")
        admitted = self.admission.admit(row)
        try:
            # AsyncLLM aborts the engine request itself (and awaits it) when this generator is
            # closed early, so the slot is released only once the row is gone from the engine.
            async for output in self._llm.generate(
                admitted.prompt, admitted.sampling, row.request_id, priority=row.priority
            ):
                yield await outputs.step_off_loop(output, row)
        except EngineDeadError as exc:
            raise EngineDown(f"the engine died while serving this request ({exc}); retry later") from exc
        finally:
            self.admission.release(admitted)

    async def generate_group(self, rows: list[RowRequest]) -> list[StepStream]:
        """Admit several rows so that the scheduler sees them in one step (NBCE's lockstep rows);
        one step stream per row, closing a stream aborts its row."""
        if not self.alive or self._groups is None:
            raise EngineDown("the engine is down; it is being restarted, retry later")
        return await self._groups.admit(rows)

    async def abort(self, request_ids: list[str]) -> None:
        if self._llm is not None and request_ids:
            await self._llm.abort(request_ids)

    async def check_health(self) -> None:
        await self._llm.check_health()
