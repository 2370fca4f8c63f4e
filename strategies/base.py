"""The strategy interface.

A strategy turns one request (documents, question, how many tokens to generate) into an
execution plan for the engine: the RoPE configuration to run under, the prompt rows, the
longest total length that configuration allows, and for several rows the combiner that runs
them. The engine runs plans; it never sees strategies.

Planning is a function of values: the request carries its token ids (strategies/tokens.py,
tokenized by the service beforehand) and the context the model's facts and the strategy registry;
a strategy calls nothing outside the strategies.

    >>> from strategies.base import PlanContext, PromptTokens, StrategyRequest
    >>> from strategies.registry import default_registry
    >>> from server.plan import ModelFacts
    >>> registry = default_registry()
    >>> model = ModelFacts("m", native_window=8192, rope_parameters={"rope_theta": 1e5}, head_dim=64, vocab_size=100)
    >>> request = StrategyRequest("question", tokens=PromptTokens((1,) * 12_000))
    >>> plan = registry.resolve({"name": "yarn", "factor": 2}).plan(request, PlanContext(model, registry))
    >>> plan.rope.label(), plan.max_total_tokens
    ('yarn-x2', 16384)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, model_validator

# The plan types (server/plan.py): strategies produce them, and plugins import them from here.
from server.plan import (
    MAX_REPORTED_ERRORS,
    ExecutionPlan,
    ModelFacts,
    RopeConfig,
    StrategyError,
    StrategySpec,
    clipped,
    refuse_many_unknown,
)
from strategies.tokens import PromptTokens, TokenizedText

__all__ = [
    "DOCUMENT_SEPARATOR",
    "MAX_REPORTED_ERRORS",
    "ExecutionPlan",
    "ModelFacts",
    "PlanContext",
    "PromptTokens",
    "RopeConfig",
    "Strategy",
    "StrategyError",
    "StrategyParams",
    "StrategyRequest",
    "StrategyResolver",
    "StrategySpec",
    "TokenizedText",
    "check_fits",
    "clipped",
    "refuse_many_unknown",
    "too_many_rows",
]

DOCUMENT_SEPARATOR = "\n\n"
# Tokens a question is counted as at least where a strategy sizes something from the question's
# length (dynamic_ntk's base, nbce's chunks): questions up to this long on the same documents then
# plan the same rows, so the second reads the first's KV from the prefix cache.
QUESTION_RESERVE_TOKENS = 256


@dataclass(frozen=True)
class StrategyRequest:
    """One request as strategies see it: its text, and its token ids (`tokens`). `token_ids`: the
    prompt as the client sent it in token ids (OpenAI's `prompt: [ids]`), then without documents;
    `inputs` is their decoded text."""

    inputs: str
    documents: tuple[str, ...] = ()
    max_new_tokens: int = 64
    token_ids: tuple[int, ...] | None = None
    # Set by the service before planning; a request built elsewhere (a test, a strategy planning a
    # row for another) sets it itself.
    tokens: PromptTokens | None = None
    # The client reads the prompt's own log-probabilities (echo, decoder_input_details): a scoring
    # request, whose quality is the perplexity of the prompt rather than what is generated.
    scoring: bool = False

    def plain_prompt(self) -> str:
        """The text the plain strategies read (docs/CONTRACT.md): documents, blank line, inputs."""
        return DOCUMENT_SEPARATOR.join((*self.documents, self.inputs))

    def prompt_tokens(self) -> PromptTokens:
        """The request's token ids; a request planned without them is a bug, not a client error."""
        if self.tokens is None:
            raise ValueError("a StrategyRequest is planned without its tokens (StrategyRequest.tokens)")
        return self.tokens

    def plain_prompt_ids(self) -> list[int]:
        """The one row the plain strategies run: the plain prompt's ids (or the client's)."""
        return list(self.prompt_tokens().prompt)


class StrategyParams(BaseModel):
    """Base for parameter models: unknown keys are errors, not silently ignored, numbers are
    finite (every field also has finite bounds, so a value reaches the engine only if it can
    build something from it), and types are strict like the request body's: no "2" for 2, no
    "yes" or 1 for true, no 2.0 for an integer (an integer is a float, as in JSON)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _few_unknown_parameters(cls, data: Any) -> Any:
        return refuse_many_unknown(data, cls.model_fields.keys(), "parameters")


class StrategyResolver(Protocol):
    """The strategy registry as planning sees it (strategies/registry.py): a spec, built."""

    def resolve(self, spec: StrategySpec) -> Strategy[Any]: ...


@dataclass(frozen=True)
class PlanContext:
    """What a strategy may use while planning, all of it values: the model, the server's strategy
    registry (for strategies built on others: `auto`, NBCE's rows), its options and the engine's row
    limit."""

    model: ModelFacts
    registry: StrategyResolver
    # Server-side configuration strategies may read, keyed by what it is (e.g. "auto_policy": the
    # measured policy `auto` follows); set by the server, never by a request.
    options: Mapping[str, Any] = field(default_factory=dict)
    # Rows the engine runs in one step: the most rows a plan decoded in lockstep may have (None:
    # no limit), known before planning so that a strategy can count rows before it builds them.
    max_rows: int | None = None

    def resolve(self, spec: StrategySpec) -> Strategy[Any]:
        """`spec` (a name or {"name": ..., **params}) built by the server's registry (StrategyError)."""
        return self.registry.resolve(spec)


P = TypeVar("P", bound=StrategyParams)


class Strategy(ABC, Generic[P]):
    """One long-context strategy. Subclasses set `name`, `description` and `Params`.

    A strategy whose plans have several rows puts a combiner in them (server/plan.py: a
    `LockstepCombiner`, whose rows the service decodes in lockstep, or a `RowCombiner`); if it needs
    code inside the engine (a vLLM logits processor, "module:Class"), it names it in
    `engine_logits_processors` and the server registers it when the engine starts.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    Params: ClassVar[type[StrategyParams]]
    engines: ClassVar[tuple[str, ...]] = ("vllm",)
    engine_logits_processors: ClassVar[tuple[str, ...]] = ()

    def __init__(self, params: P) -> None:
        self.params: P = params

    @classmethod
    def parameters_schema(cls) -> dict[str, Any]:
        return cls.Params.model_json_schema()

    def prompt_texts(self, request: StrategyRequest, context: PlanContext) -> StrategyRequest:
        """The request's texts as this strategy reads them, which the service then tokenizes for
        `plan` (NBCE's `split` cuts a prompt into document and question), or StrategyError for a
        request refused on its texts alone, before the work of tokenizing them. By default, the
        texts as sent."""
        return request

    @abstractmethod
    def plan(self, request: StrategyRequest, context: PlanContext) -> ExecutionPlan:
        """Build the execution plan from the request's token ids (`request.tokens`, set), or raise
        StrategyError. Planning reads values only: it is run inline, on the server's event loop."""

    def resolved(self) -> dict[str, Any]:
        return {"name": self.name, **self.params.model_dump()}


def too_many_rows(rows: int, limit: int) -> StrategyError:
    """The refusal of a plan whose `rows` decoded in lockstep are more than one engine step runs."""
    return StrategyError(
        f"context: this strategy needs {rows} rows (one per document or chunk, plus one), more than "
        f"the {limit} rows the engine runs in one step; send fewer, longer documents",
        field="context",
    )


def check_fits(prompt_tokens: int, max_new_tokens: int, limit: int, strategy: str, hint: str = "") -> None:
    """Raise the 422 the contract asks for when prompt + max_new_tokens exceeds `limit`."""
    if prompt_tokens + max_new_tokens > limit:
        raise StrategyError(
            f"inputs: the prompt has {prompt_tokens} tokens and max_new_tokens is {max_new_tokens}; "
            f"together they must be <= {limit} with strategy '{strategy}'" + (f". {hint}" if hint else ""),
            field="inputs",
        )
