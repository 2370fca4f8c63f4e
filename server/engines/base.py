"""The small interface between strategies/service and an inference engine.

Everything here is plain data: the HTTP layer and the strategies never see vLLM types.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from strategies.base import ModelFacts, RopeConfig

FinishReason = Literal["length", "eos_token", "stop_sequence"]


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
    # Opaque per-request data for engine-side processors (e.g. NBCE's row group).
    extra_args: dict[str, Any] | None = None


@dataclass(frozen=True)
class TokenEvent:
    id: int
    text: str
    logprob: float | None
    special: bool


@dataclass
class EngineStep:
    """New tokens of one row since the previous step."""

    tokens: list[TokenEvent]
    text: str = ""
    finished: bool = False
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0


@dataclass(frozen=True)
class RowRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingOptions
    # Separates prefix-cache entries of requests that must not share KV (e.g. other RoPE scalings).
    cache_salt: str | None = None


@dataclass(frozen=True)
class EngineStats:
    kv_cache_usage: float = 0.0
    running_requests: int = 0
    waiting_requests: int = 0
    extra: dict[str, float] = field(default_factory=dict)


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str: ...


class Engine(Protocol):
    """One running model under one RoPE configuration."""

    kind: str
    rope: RopeConfig
    model: ModelFacts

    @property
    def tokenizer(self) -> Tokenizer: ...

    def generate(self, row: RowRequest) -> AsyncIterator[EngineStep]: ...

    async def abort(self, request_ids: list[str]) -> None: ...

    def stats(self) -> EngineStats: ...

    async def check_health(self) -> None: ...

    def shutdown(self) -> None: ...


class EngineProvider(Protocol):
    """Hands out an engine for a RoPE configuration (one engine today; a pool later)."""

    model: ModelFacts

    async def engine_for(self, rope: RopeConfig) -> Engine: ...

    def engines(self) -> list[Engine]: ...

    async def start(self) -> None: ...

    def shutdown(self) -> None: ...
