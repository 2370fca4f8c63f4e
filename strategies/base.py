"""The strategy interface.

A strategy turns one request (documents, question, how many tokens to generate) into an
execution plan for the engine: the RoPE configuration to run under, the prompt rows, and the
longest total length that configuration allows. The engine runs plans; it never sees strategies.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

# The engine-facing types live with the engine API; strategies produce them (and plugins import
# them from here).
from server.engines.base import ExecutionPlan, ModelFacts, RopeConfig

__all__ = [
    "DOCUMENT_SEPARATOR", "ExecutionPlan", "ModelFacts", "RopeConfig", "Strategy", "StrategyError",
    "StrategyParams", "StrategyRequest", "Tokenize", "check_fits",
]

DOCUMENT_SEPARATOR = "\n\n"


class StrategyError(ValueError):
    """A request the strategy cannot serve; `field` names the request field at fault."""

    def __init__(self, message: str, field: str = "strategy") -> None:
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass(frozen=True)
class StrategyRequest:
    inputs: str
    documents: tuple[str, ...] = ()
    max_new_tokens: int = 64

    def plain_prompt(self) -> str:
        """The text the plain strategies read (CONTRACT.md): documents, blank line, inputs."""
        return DOCUMENT_SEPARATOR.join((*self.documents, self.inputs))


Tokenize = Callable[[str], list[int]]


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
    """Base for parameter models: unknown keys are errors, not silently ignored, and numbers are
    finite (every field also has finite bounds, so a value reaches the engine only if it can
    build something from it)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def check_fits(prompt_tokens: int, max_new_tokens: int, limit: int, strategy: str, hint: str = "") -> None:
    """Raise the 422 the contract asks for when prompt + max_new_tokens exceeds `limit`."""
    if prompt_tokens + max_new_tokens > limit:
        raise StrategyError(
            f"inputs: the prompt has {prompt_tokens} tokens and max_new_tokens is {max_new_tokens}; "
            f"together they must be <= {limit} with strategy '{strategy}'" + (f". {hint}" if hint else ""),
            field="inputs",
        )
