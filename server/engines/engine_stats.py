"""How an engine is spread over devices and what it reports of its work: `Parallelism`,
`EngineStats` (at a scrape), `EngineIteration` (after every iteration). Part of the engine API
(server/engines/base.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ExecutorBackend = Literal["mp", "ray"]


@dataclass(frozen=True)
class Parallelism:
    """How one engine spreads the model over devices (vLLM's parallel settings).

    `tensor` ranks split every layer, `pipeline` stages split the layers, `data` replicas each
    hold the whole model and take their own rows; `backend` starts the ranks (`mp`: processes on
    this host, `ray`: a Ray cluster, needed for several nodes).
    """

    tensor: int = 1
    pipeline: int = 1
    data: int = 1
    backend: ExecutorBackend = "mp"

    @property
    def ranks(self) -> int:
        """Worker processes the engine runs: one per device (or CPU core group)."""
        return self.tensor * self.pipeline * self.data

    def labels(self) -> dict[str, str]:
        """The settings as metric labels (the names vLLM's CLI uses)."""
        return {
            "tensor_parallel_size": str(self.tensor),
            "pipeline_parallel_size": str(self.pipeline),
            "data_parallel_size": str(self.data),
            "distributed_executor_backend": self.backend,
        }


@dataclass(frozen=True)
class EngineStats:
    kv_cache_usage: float = 0.0
    running_requests: int = 0
    waiting_requests: int = 0
    # RoPE configurations that hold a slot in the engine's table now, and the slots there are.
    rope_slots_in_use: int = 0
    rope_slots: int = 0
    rope_slot_loads: int = 0


@dataclass(frozen=True)
class FinishedRow:
    """A row the engine finished in an iteration, with where its time went and how much of its
    prompt the prefix cache served (`cached_tokens` of `prompt_tokens`: not computed again)."""

    request_id: str
    queued_s: float
    prefill_s: float
    prompt_tokens: int = 0
    cached_tokens: int = 0


@dataclass(frozen=True)
class EngineIteration:
    """What one engine iteration reports to its stats listener (the metrics room).

    The scheduler's figures are None when the iteration carried none; `step` when it carried no
    step details."""

    kv_cache_usage: float | None = None
    running_requests: int | None = None
    waiting_requests: int | None = None
    preempted_rows: int = 0
    finished: tuple[FinishedRow, ...] = ()
    step: StepWork | None = None


@dataclass(frozen=True)
class StepWork:
    """What one engine step computed: prompt tokens (prefill chunks, prefix-cache hits excluded),
    decode tokens (one per decoding row), and how long it took."""

    prefill_tokens: int
    decode_tokens: int
    seconds: float
