"""The strategy interface.

A strategy turns one request (documents, question, how many tokens to generate) into an
execution plan for the engine: the RoPE configuration to run under, the prompt rows, and the
longest total length that configuration allows. The engine runs plans; it never sees strategies.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

DOCUMENT_SEPARATOR = "\n\n"


class StrategyError(ValueError):
    """A request the strategy cannot serve; `field` names the request field at fault."""

    def __init__(self, message: str, field: str = "strategy") -> None:
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass(frozen=True)
class ModelFacts:
    model_id: str
    native_window: int
    rope_parameters: dict[str, Any]
    head_dim: int
    vocab_size: int
    eos_token_ids: tuple[int, ...] = ()
    # The longest prompt + max_new_tokens one engine's KV cache holds (None: not known / no cap).
    max_context_tokens: int | None = None

    @property
    def rope_theta(self) -> float:
        return float(self.rope_parameters.get("rope_theta", 10000.0))


@dataclass(frozen=True)
class RopeConfig:
    """A complete RoPE configuration: what an engine is started with.

    `parameters` is the model's full `rope_parameters` dict (vLLM's hf_overrides take it as
    given, so it must be complete); an empty dict means the model's own configuration.
    """

    parameters: tuple[tuple[str, Any], ...] = ()
    max_model_len: int | None = None

    @classmethod
    def native(cls) -> RopeConfig:
        return cls()

    @classmethod
    def from_dict(cls, parameters: dict[str, Any], max_model_len: int) -> RopeConfig:
        return cls(tuple(sorted(parameters.items())), max_model_len)

    @property
    def is_native(self) -> bool:
        return not self.parameters and self.max_model_len is None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.parameters)

    def key(self) -> str:
        """A stable name for this configuration (engine pool key, cache salt, metrics)."""
        if self.is_native:
            return "native"
        return json.dumps({"rope": self.as_dict(), "len": self.max_model_len}, sort_keys=True)


@dataclass(frozen=True)
class StrategyRequest:
    inputs: str
    documents: tuple[str, ...] = ()
    max_new_tokens: int = 64

    def plain_prompt(self) -> str:
        """The text the plain strategies read (CONTRACT.md): documents, blank line, inputs."""
        return DOCUMENT_SEPARATOR.join((*self.documents, self.inputs))


Tokenize = Callable[[str], list[int]]


@dataclass
class ExecutionPlan:
    """What the engine runs for one request.

    One row is an ordinary generation; several rows are decoded in lockstep and combined
    (`combiner` names how, e.g. NBCE). `resolved` is echoed back in the response.
    """

    rope: RopeConfig
    rows: list[list[int]]
    max_total_tokens: int
    resolved: dict[str, Any]
    combiner: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(row) for row in self.rows)


class Strategy(ABC):
    """One long-context strategy. Subclasses set `name`, `description` and `Params`."""

    name: ClassVar[str]
    description: ClassVar[str]
    Params: ClassVar[type[BaseModel]]
    engines: ClassVar[tuple[str, ...]] = ("vllm",)

    def __init__(self, params: BaseModel) -> None:
        self.params = params

    @classmethod
    def parameters_schema(cls) -> dict[str, Any]:
        return cls.Params.model_json_schema()

    @abstractmethod
    def plan(self, request: StrategyRequest, model: ModelFacts, tokenize: Tokenize) -> ExecutionPlan:
        """Build the execution plan, or raise StrategyError."""

    def resolved(self) -> dict[str, Any]:
        return {"name": self.name, **self.params.model_dump()}


class StrategyParams(BaseModel):
    """Base for parameter models: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


def check_fits(prompt_tokens: int, max_new_tokens: int, limit: int, strategy: str, hint: str = "") -> None:
    """Raise the 422 the contract asks for when prompt + max_new_tokens exceeds `limit`."""
    if prompt_tokens + max_new_tokens > limit:
        raise StrategyError(
            f"inputs: the prompt has {prompt_tokens} tokens and max_new_tokens is {max_new_tokens}; "
            f"together they must be <= {limit} with strategy '{strategy}'" + (f". {hint}" if hint else ""),
            field="inputs",
        )
