"""The engine API: the plain data strategies produce and engines consume, and the `Engine` protocol.

This module depends on nothing of the project's: strategies import it (they produce
`RopeConfig` and `ExecutionPlan` from `ModelFacts`), engines implement `Engine`, and the service
between them runs plans on an engine. The HTTP layer and the strategies never see vLLM types;
engines never see strategies.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol, runtime_checkable

FinishReason = Literal["length", "eos_token", "stop_sequence"]


@dataclass(frozen=True)
class ModelFacts:
    model_id: str
    native_window: int
    rope_parameters: dict[str, Any]
    head_dim: int
    vocab_size: int
    eos_token_ids: tuple[int, ...] = ()
    # The longest prompt + max_new_tokens one request may have on this server: the engine's
    # max_model_len, which the KV cache must hold (None: not known / no cap).
    max_context_tokens: int | None = None

    @property
    def rope_theta(self) -> float:
        return float(self.rope_parameters.get("rope_theta", 10000.0))

    @property
    def rotary_dim(self) -> int:
        """Dimensions of each head the RoPE rotates (vLLM's rule: head_dim x partial_rotary_factor)."""
        return int(self.head_dim * float(self.rope_parameters.get("partial_rotary_factor", 1.0)))


WindowKind = Literal["rerope", "leaky_rerope", "self_extend", "dca"]


@dataclass(frozen=True)
class AttentionScheme:
    """How a row's attention sees positions, beyond rotating each token at its own position.

    Window kinds score a (query i, key j) pair with ordinary RoPE while i - j < `window`, and
    with the query rotated at a(i), the key at b(j) beyond it (docs/design/window-attention.md):

    | kind          | a(i)                           | b(j)        | relative position a(i) - b(j) |
    |---------------|--------------------------------|-------------|-------------------------------|
    | rerope        | w                              | 0           | w                             |
    | leaky_rerope  | w - w/leak + i/leak            | j/leak      | w + (i - j - w)/leak          |
    | self_extend   | i//group + w - w//group        | j//group    | grouped distance, shifted     |

    Dual Chunk Attention (`dca`, docs/design/dual-chunk-attention.md) cuts the row into chunks of
    c = chunk_size - local_window tokens; every key sits at j mod c, and a query at i mod c for
    keys of its own chunk, at min(i mod c + c, chunk_size) for the previous chunk, and at
    min(2c - 1, chunk_size) for earlier ones.

    `logn_window` (L0) scales the query at position i by max(1, ln(i + 1) / ln L0), with or
    without a window kind.
    """

    kind: WindowKind | None = None
    window: int = 0
    leak: float = 1.0
    group: int = 1
    chunk_size: int = 0
    local_window: int = 0
    logn_window: int | None = None

    @property
    def chunk_len(self) -> int:
        """DCA's chunk length c (0 for other kinds)."""
        return self.chunk_size - self.local_window if self.kind == "dca" else 0

    def label(self) -> str:
        parts: list[str] = [self.kind or ""]
        if self.kind == "dca":
            parts[0] += f"-s{self.chunk_size}-l{self.local_window}"
        elif self.kind is not None:
            parts[0] += f"-w{self.window}"
        if self.kind == "leaky_rerope":
            parts.append(f"k{self.leak:g}")
        if self.kind == "self_extend":
            parts.append(f"g{self.group}")
        if self.logn_window is not None:
            parts.append("logn")
        return "-".join(p for p in parts if p)


@dataclass(frozen=True)
class RopeConfig:
    """A complete RoPE configuration: what one request's positions are rotated with.

    `parameters` is the model's full `rope_parameters` dict (vLLM builds its rotary from it as
    given, so it must be complete); an empty dict means the model's own configuration.
    `max_model_len` is the longest total length (prompt + generated) the configuration allows.
    `attention`, when set, changes how scores see positions (window kinds, log-n): the engine
    then runs the row's attention itself (server/engines/window_attention/).
    """

    parameters: tuple[tuple[str, Any], ...] = ()
    max_model_len: int | None = None
    attention: AttentionScheme | None = None

    @classmethod
    def native(cls) -> RopeConfig:
        return cls()

    @classmethod
    def from_dict(
        cls, parameters: dict[str, Any], max_model_len: int, attention: AttentionScheme | None = None
    ) -> RopeConfig:
        return cls(tuple(sorted(parameters.items())), max_model_len, attention)

    @property
    def is_native(self) -> bool:
        return not self.parameters and self.max_model_len is None and self.attention is None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.parameters)

    def key(self) -> str:
        """A stable name for this configuration (RoPE slot key, prefix-cache salt)."""
        if self.is_native:
            return "native"
        key: dict[str, Any] = {"rope": self.as_dict(), "len": self.max_model_len}
        if self.attention is not None:
            key["attention"] = asdict(self.attention)
        return json.dumps(key, sort_keys=True)

    def label(self) -> str:
        """A short, bounded-cardinality name for logs and metrics: the RoPE type and its factor."""
        if self.is_native:
            return "native"
        params = self.as_dict()
        label = str(params.get("rope_type", "custom")) if params else "native"
        if params.get("factor") is not None:
            label += f"-x{float(params['factor']):g}"
        if self.attention is not None:
            label += "+" + self.attention.label()
        return label


@dataclass
class ExecutionPlan:
    """What the engine runs for one request.

    One row is an ordinary generation; several rows are run by the plan's `combiner` (e.g.
    NBCE's lockstep decoding), which turns them into one token stream. `resolved` is echoed back
    in the response.
    """

    rope: RopeConfig
    rows: list[list[int]]
    max_total_tokens: int
    resolved: dict[str, Any]
    combiner: RowCombiner | None = None

    @property
    def prompt_tokens(self) -> int:
        return sum(len(row) for row in self.rows)


@dataclass(frozen=True)
class SamplingOptions:
    max_new_tokens: int
    greedy: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    ignore_eos: bool = False
    top_logprobs: int = 0
    # Log-probabilities of the prompt's tokens, with this many alternatives each (None: not asked).
    prompt_logprobs: int | None = None
    # Opaque per-request data for engine-side processors (e.g. NBCE's row group).
    extra_args: dict[str, Any] | None = None


@dataclass(frozen=True)
class TopToken:
    """One of the likeliest tokens at a position, with its log-probability."""

    id: int
    text: str
    logprob: float


@dataclass(frozen=True)
class TokenEvent:
    """A generated (or, in `EngineStep.prompt_logprobs`, a prompt) token.

    `logprob` is None where there is none (logprobs not asked for; the first prompt token);
    `top` holds the token itself and the `top_logprobs` likeliest ones, as the engine ranks them."""

    id: int
    text: str
    logprob: float | None
    special: bool
    top: tuple[TopToken, ...] = ()


@dataclass
class EngineStep:
    """New tokens of one row since the previous step."""

    tokens: list[TokenEvent]
    text: str = ""
    finished: bool = False
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    # The prompt's tokens with their log-probabilities, once, when `prompt_logprobs` was asked for.
    prompt_logprobs: list[TokenEvent] | None = None


# A row's (or a combined request's) new tokens as they come; closing it aborts the engine rows.
StepStream = AsyncGenerator[EngineStep, None]


@dataclass(frozen=True)
class RowRequest:
    """One engine row: a prompt, how to sample it, and the RoPE configuration it runs under.

    Rows of different configurations share the engine and its batch; the engine keeps their
    prefix-cache entries apart (their keys are rotated differently).
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingOptions
    rope: RopeConfig = RopeConfig()


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
    """A row the engine finished in an iteration, with where its time went."""

    request_id: str
    queued_s: float
    prefill_s: float


@dataclass(frozen=True)
class EngineIteration:
    """What one engine iteration reports to its stats listener (the metrics room).

    The scheduler's figures are None when the iteration carried none."""

    kv_cache_usage: float | None = None
    running_requests: int | None = None
    waiting_requests: int | None = None
    preempted_rows: int = 0
    finished: tuple[FinishedRow, ...] = ()


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
    # Per-request figures the combiner reports (e.g. "kv_tokens": what its rows held together).
    stats: dict[str, Any]


class RowCombiner(Protocol):
    """Runs the rows of a multi-row plan on an engine and yields one combined token stream.

    A strategy puts one in its plan (NBCE: strategies/nbce/runner.py); the service runs it in
    place of a single-row generation. Closing the stream must abort every row it started.
    """

    @property
    def name(self) -> str:
        """What the combiner is (logs, tests)."""
        ...

    def run(self, engine: Engine, job: RowJob) -> StepStream: ...


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
