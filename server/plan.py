"""The plan types: what a strategy produces from a request and an engine consumes.

This module depends on nothing of the project (and on nothing outside the standard library at run
time), so strategies, engines, the server and the Python client all import it:

- `ModelFacts`: what a strategy may know of the served model;
- `AttentionScheme`: the interface of an attention scheme — how a row's attention sees positions,
  beyond rotating each token at its own position (one small file per scheme in server/attention/);
- `RopeConfig`: a row's complete RoPE configuration, with its attention scheme if any;
- `OutputConstraint`: what a row's output must match (structured output);
- `ExecutionPlan`: what the engine runs for one request (rows under one `RopeConfig`), and how
  several rows become one stream (`LockstepCombiner`, `RowCombiner`);
- `StrategySpec`, `StrategyError`, `FinishReason`: a request's `strategy` field, a strategy's
  refusal, why a generation ended; `clipped` and `refuse_many_unknown`, how client text and unknown
  keys are quoted in a refusal (the contract's schemas and the strategies' parameters alike).

    >>> from server.attention.rerope import Rerope
    >>> rope = RopeConfig((), 32768, Rerope(window=4096, logn_window=8192))
    >>> rope.label(), rope.is_native
    ('native+rerope-w4096-logn', False)
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Iterable
from dataclasses import dataclass, field, fields
from itertools import islice
from typing import TYPE_CHECKING, Any, ClassVar, Literal, NamedTuple, Protocol, get_args, runtime_checkable

if TYPE_CHECKING:  # the engine side of a scheme works on tensors; the plan itself needs no torch
    from torch import Tensor

# A refusal lists at most this many problems (of a body or a strategy's parameters) and a count of
# the rest: a body of many bad items must not cost a second of the event loop and megabytes of reply.
MAX_REPORTED_ERRORS = 10

# A request's `strategy` field: a registered name, or {"name": ..., **parameters}.
StrategySpec = str | dict[str, Any]
FinishReason = Literal["length", "eos_token", "stop_sequence"]


class StrategyError(ValueError):
    """A request the strategy cannot serve; `field` names the request field at fault."""

    def __init__(self, message: str, field: str = "strategy") -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def clipped(text: str, limit: int = 64) -> str:
    """Client text quoted in an error message, cut to `limit` characters."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def refuse_many_unknown(data: Any, known: Iterable[str], what: str) -> Any:
    """A model's `before` validator: many unknown keys of a JSON object are one error naming the
    first few, not one error each (pydantic itself reports each)."""
    if not isinstance(data, dict):
        return data
    fields = set(known)
    unknown = len(data.keys() - fields)
    if unknown > MAX_REPORTED_ERRORS:
        first = islice((key for key in data if key not in fields), MAX_REPORTED_ERRORS)
        shown = ", ".join(repr(clipped(str(key))) for key in first)
        raise ValueError(f"{unknown} unknown {what}, not allowed (the first: {shown})")
    return data


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


class RowKV(NamedTuple):
    """One row's keys and values as an attention scheme reads them: [kv_heads, n, head_dim] each,
    keys as the paged cache holds them (rotated at the scheme's `table_positions`)."""

    keys: Tensor
    values: Tensor
    # The keys rotated at their far positions (`AttentionScheme.far_keys`); the keys themselves
    # when the scheme keeps none.
    far_keys: Tensor


class AttentionScheme(ABC):
    """How a row's attention sees positions, beyond rotating each token at its own position.

    A scheme is a frozen dataclass of its parameters (its fields travel to the engine core as
    `spec()`), registered by `kind` in server/attention/__init__.py. The engine asks it, per step:

    1. `table_positions`: where the model's rotary rotates the row's tokens, i.e. where its keys sit
       in the paged cache (default: their own positions);
    2. `far_keys`: keys rotated on to where the scheme scores them from afar, computed once per key
       as it enters the row's copy (default: none kept);
    3. `query_scale`: a factor on the queries (log-n, DCA's mscale), applied before attention;
    4. `attend`: the row's attention from its queries, keys and values — or, where
       `computes_attention` is False, vLLM's own kernel runs the row (a scheme that only scales).

    Strategies read `max_distance`, the largest relative position a score sees in a row of n tokens,
    to bound the row's length; `label` names the scheme in metrics and logs.
    """

    kind: ClassVar[str]
    computes_attention: ClassVar[bool] = True

    @abstractmethod
    def label(self) -> str:
        """A short name with the parameters that matter (bounded cardinality: no request text)."""

    @abstractmethod
    def max_distance(self, n: int) -> float:
        """The largest relative position any (query, key) pair of a row of n tokens is scored at."""

    def table_positions(self, positions: Tensor) -> Tensor:
        return positions

    def far_keys(self, keys: Tensor, first: int, inv_freq: Tensor) -> Tensor | None:
        """Keys [kv_heads, m, d] at positions first.., rotated there, rotated on to their far
        positions; None when the scheme keeps no far keys."""
        return None

    def query_scale(self, positions: Tensor, length: int) -> Tensor | None:
        """A factor per query position (float64), or None for none. `length`: the row's length as
        the scheme sizes itself by — its whole prompt while the prompt is read (in however many
        steps), its current length once it decodes."""
        return None

    def attend(self, q: Tensor, row: RowKV, first: int, inv_freq: Tensor, scale: float) -> Tensor:
        """Attention of queries q [C, heads, d] at positions first.. (rotated at `table_positions`,
        scaled by `query_scale`) over the row's n = first + C keys and values; [C, heads, d]."""
        raise NotImplementedError(f"{self.kind} leaves the attention to the engine's kernel")

    def spec(self) -> dict[str, Any]:
        """What travels to the engine core: the kind and the fields (server.attention.scheme_from_spec)."""
        return {"kind": self.kind, **{f.name: getattr(self, f.name) for f in fields(self)}}  # type: ignore[arg-type]


@dataclass(frozen=True)
class RopeConfig:
    """A complete RoPE configuration: what one request's positions are rotated with.

    `parameters` is the model's full `rope_parameters` dict (vLLM builds its rotary from it as
    given, so it must be complete); an empty dict means the model's own configuration.
    `max_model_len` is the longest total length (prompt + generated) the configuration allows.
    `attention`, when set, changes how scores see positions: the engine then runs the row's
    attention through the scheme.
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
            key["attention"] = self.attention.spec()
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


ConstraintKind = Literal["json", "json_object", "regex", "grammar"]
CONSTRAINT_KINDS: tuple[str, ...] = get_args(ConstraintKind)


@dataclass(frozen=True)
class OutputConstraint:
    """`spec`: the JSON schema as JSON text (`json`), the regular expression (`regex`), the grammar
    in EBNF or Lark (`grammar`; a list of choices arrives as one), "" for `json_object`.

    `source` names the request field it came from, for messages; it is not part of its identity."""

    kind: ConstraintKind
    spec: str = ""
    source: str = field(default="", compare=False)

    def key(self) -> tuple[str, str]:
        """What a compiled grammar is cached under."""
        return (self.kind, self.spec)

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "spec": self.spec}

    @classmethod
    def from_dict(cls, raw: Any) -> OutputConstraint:
        """The constraint `to_dict` wrote; ValueError if it is not one."""
        if not isinstance(raw, dict) or raw.get("kind") not in CONSTRAINT_KINDS or not isinstance(raw.get("spec"), str):
            raise ValueError(f"not an output constraint: {str(raw)[:100]}")
        return cls(raw["kind"], raw["spec"])


class RowCombiner(Protocol):
    """Runs the rows of a multi-row plan on an engine and yields one combined token stream.

    A plugin strategy may bring one that drives the engine itself; the service runs it in place of
    a single-row generation. Closing the stream must abort every row it started. The engine
    (server/engines/base.py `Engine`), the job (`RowJob`) and the steps (`EngineStep`) are the
    engine API's types: the plan types import nothing of the project, so they are not named here.
    """

    @property
    def name(self) -> str:
        """What the combiner is (logs, tests)."""
        ...

    def run(self, engine: Any, job: Any) -> AsyncGenerator[Any, None]: ...


@dataclass(frozen=True)
class LockstepRow:
    """One row of one submission of a lockstep group, as its combiner tags it for the engine.

    `group` names the submission (request id:attempt); `row` is the row's index among `rows`;
    `base` is how many tokens were confirmed before this submission (appended to every row's
    prompt); `stop_token_ids` are the tokens that end the request (EOS, unless ignored by the
    combination's own rule: the processor reads them).
    """

    job: str
    group: str
    row: int
    rows: int
    base: int
    stop_token_ids: tuple[int, ...] = ()


@runtime_checkable
class LockstepCombiner(Protocol):
    """Rows that decode in lockstep, one token forced into every row at each step by a logits
    processor inside the engine; the service runs them (server/service/lockstep.py) and the
    combiner only says what each row carries to that processor (NBCE: strategies/nbce/protocol.py).

    `sampling` is the request's `SamplingOptions` (server/engines/rows.py), not named here for the
    reason `RowCombiner` gives.
    """

    @property
    def name(self) -> str:
        """What the combiner is (logs, errors, the `<name>_rows` figures of a job)."""
        ...

    def row_args(self, row: LockstepRow, sampling: Any) -> dict[str, Any]:
        """The `extra_args` of one row of a submission."""
        ...

    def prefill_args(self, sampling: Any) -> dict[str, Any] | None:
        """The `extra_args` of a row's one-token prefill, run before the group is admitted."""
        ...


@dataclass
class ExecutionPlan:
    """What the engine runs for one request.

    One row is an ordinary generation; several rows are turned into one token stream by the plan's
    `combiner`: the service decodes a `LockstepCombiner`'s rows in lockstep (NBCE), and runs a
    `RowCombiner` as it is. `resolved` is echoed back in the response.

    A strategy that ranks others (`auto`) may name `fallbacks`: plans to run instead, best first,
    where the engine refuses this plan's RoPE configuration. Which configurations the engine serves
    is the engine's to say, so the service picks, after planning: the first of the plan and its
    fallbacks that the engine serves.
    """

    rope: RopeConfig
    rows: list[list[int]]
    max_total_tokens: int
    resolved: dict[str, Any]
    combiner: RowCombiner | LockstepCombiner | None = None
    fallbacks: tuple[ExecutionPlan, ...] = ()

    def candidates(self) -> tuple[ExecutionPlan, ...]:
        """This plan, then its fallbacks: the order the service tries them in."""
        return (self, *self.fallbacks)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(row) for row in self.rows)
