"""What a row is rotated with: the model's RoPE facts, a complete RoPE configuration, and the
attention schemes that change how scores see positions. Part of the engine API (server/engines/base.py)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Literal


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
