"""The engine API: the plain data strategies produce and engines consume, and the `Engine` protocol.

The API is this module and the four it re-exports, which depend on nothing else of the project:

- rows.py: `RowRequest`, `SamplingOptions`, `EngineStep`, `TokenEvent` (a row in, its steps out);
- engine_stats.py: `Parallelism`, `EngineStats`, `EngineIteration` (what an engine reports);
- output_constraint.py: `OutputConstraint` (what a row's output must match: structured output) and
  `compile_constraint`;
- here: `ExecutionPlan` and the protocols at the seams (`Engine`, `RowCombiner`, `StepAware`, ...).

Strategies import it from here (they produce `RopeConfig` and `ExecutionPlan` from `ModelFacts`),
engines implement `Engine`, and the service between them runs plans on an engine. The HTTP layer
and the strategies never see vLLM types; engines never see strategies.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from server.engines.engine_stats import (
    EngineIteration,
    EngineStats,
    ExecutorBackend,
    FinishedRow,
    Parallelism,
    StepWork,
)
from server.engines.output_constraint import OutputConstraint, compile_constraint
from server.engines.rows import (
    EngineStep,
    RowRequest,
    SamplingOptions,
    StepStream,
    TokenEvent,
    TopToken,
)
from server.plan import ExecutionPlan, FinishReason, LockstepCombiner, LockstepRow, ModelFacts, RopeConfig, RowCombiner

__all__ = [
    "Engine",
    "EngineBusy",
    "EngineDown",
    "EngineIteration",
    "EngineStats",
    "EngineStep",
    "ExecutionPlan",
    "ExecutorBackend",
    "FinishReason",
    "FinishedRow",
    "LockstepCombiner",
    "LockstepRow",
    "OutputConstraint",
    "Parallelism",
    "RowCombiner",
    "RowJob",
    "RowRequest",
    "SamplingOptions",
    "StatsListener",
    "StepAware",
    "StepRows",
    "StepStream",
    "StepWork",
    "TokenEvent",
    "Tokenizer",
    "TopToken",
    "compile_constraint",
]


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer the server uses."""

    @property
    def eos_token_id(self) -> int | None: ...

    @property
    def all_special_ids(self) -> list[int]: ...

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str: ...

    def apply_chat_template(
        self, conversation: list[dict[str, str]], *, tokenize: bool, add_generation_prompt: bool
    ) -> str: ...


class EngineDown(RuntimeError):
    """The engine died or is restarting; retry later (HTTP 503)."""


class EngineBusy(RuntimeError):
    """The engine cannot take this row now (e.g. every RoPE slot is held); retry later (HTTP 429)."""


class RowJob(Protocol):
    """What a combiner reads of a request being served (the service's `Job`)."""

    request_id: str
    plan: ExecutionPlan
    sampling: SamplingOptions
    # The scheduling priority every row of the request runs with (RowRequest.priority).
    priority: int
    # Per-request figures the combiner reports (e.g. "kv_tokens": what its rows held together).
    stats: dict[str, Any]


class StepRows(Protocol):
    """What the engine tells an in-engine row processor about the step being computed."""

    def mid_prefill(self, num_rows: int) -> Sequence[bool]:
        """Per batch row: True when the row is inside a chunked prefill (its sampled token is
        thrown away this step), False at its decode point."""
        ...


@runtime_checkable
class StepAware(Protocol):
    """An in-engine row processor (e.g. a vLLM logits processor) that wants `StepRows`.

    Engines that can tell call `bind_step_rows` before the processor's first step, and again if
    they rebuild their processors; a processor left unbound must assume every row decodes.
    """

    def bind_step_rows(self, rows: StepRows) -> None: ...


class Engine(Protocol):
    """One running model that serves rows under any RoPE configuration it does not refuse."""

    kind: str
    model: ModelFacts
    # Seconds the engine took to start (None until started).
    startup_seconds: float | None

    @property
    def parallelism(self) -> Parallelism:
        """How the engine's ranks split the model (tensor/pipeline/data parallel sizes)."""
        ...

    @property
    def max_rows_per_step(self) -> int:
        """Rows one engine step can run together (vLLM's max_num_seqs): a row group larger than
        this could never decode in lockstep."""
        ...

    @property
    def kv_capacity_tokens(self) -> int | None:
        """Tokens the KV cache holds (None: unknown); a row group must fit in it at once."""
        ...

    @property
    def tokenizer(self) -> Tokenizer: ...

    @property
    def dtype(self) -> str: ...

    @property
    def alive(self) -> bool:
        """False once the engine has died (its process gone): it must be replaced."""
        ...

    def refuse_rope(self, rope: RopeConfig) -> str | None:
        """Why rows under `rope` cannot run here (a 422 before any engine work); None: they can."""
        ...

    def can_admit(self, rope: RopeConfig) -> bool:
        """Whether a row under `rope` would be admitted now (False: it would raise EngineBusy)."""
        ...

    def generate(self, row: RowRequest) -> StepStream:
        """Stream one row's new tokens; closing the stream aborts the row. Raises EngineBusy."""
        ...

    async def generate_group(self, rows: list[RowRequest]) -> list[StepStream]:
        """Admit several rows so that the scheduler sees them in one step (NBCE's lockstep rows)."""
        ...

    async def abort(self, request_ids: list[str]) -> None: ...

    def stats(self) -> EngineStats: ...

    async def check_health(self) -> None: ...

    def shutdown(self) -> None: ...


# Called after every engine iteration; the engine stays ignorant of Prometheus.
StatsListener = Callable[[Engine, EngineIteration], None]
