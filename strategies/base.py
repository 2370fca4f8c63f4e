"""The strategy interface.

A strategy turns one request (documents, question, how many tokens to generate) into an
execution plan for the engine: the RoPE configuration to run under, the prompt rows, the
longest total length that configuration allows, and for several rows the combiner that runs
them. The engine runs plans; it never sees strategies.

    >>> from strategies.base import PlanContext, StrategyRequest
    >>> from strategies.registry import default_registry
    >>> from server.plan import ModelFacts
    >>> registry = default_registry()
    >>> model = ModelFacts("m", native_window=8192, rope_parameters={"rope_theta": 1e5}, head_dim=64, vocab_size=100)
    >>> context = PlanContext(model, tokenize=lambda text: [1] * 12_000, resolve=registry.resolve)
    >>> plan = registry.resolve({"name": "yarn", "factor": 2}).plan(StrategyRequest("question"), context)
    >>> plan.rope.label(), plan.max_total_tokens
    ('yarn-x2', 16384)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Generic, TypeVar

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

__all__ = [
    "DOCUMENT_SEPARATOR",
    "MAX_REPORTED_ERRORS",
    "ExecutionPlan",
    "ModelFacts",
    "PlanContext",
    "RopeConfig",
    "Strategy",
    "StrategyError",
    "StrategyParams",
    "StrategyRequest",
    "StrategySpec",
    "Tokenize",
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
Tokenize = Callable[[str], list[int]]


@dataclass(frozen=True)
class StrategyRequest:
    """One request as strategies see it. `token_ids`: the prompt as token ids (OpenAI's
    `prompt: [ids]`), then without documents; `inputs` is their decoded text."""

    inputs: str
    documents: tuple[str, ...] = ()
    max_new_tokens: int = 64
    token_ids: tuple[int, ...] | None = None
    # The client reads the prompt's own log-probabilities (echo, decoder_input_details): a scoring
    # request, whose quality is the perplexity of the prompt rather than what is generated.
    scoring: bool = False

    def plain_prompt(self) -> str:
        """The text the plain strategies read (docs/CONTRACT.md): documents, blank line, inputs."""
        return DOCUMENT_SEPARATOR.join((*self.documents, self.inputs))

    def plain_prompt_ids(self, tokenize: Tokenize) -> list[int]:
        """The one row the plain strategies run: the given token ids, else the plain prompt tokenized."""
        return list(self.token_ids) if self.token_ids is not None else tokenize(self.plain_prompt())


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


@dataclass(frozen=True)
class PlanContext:
    """What a strategy may use while planning: the model, its tokenizer, and the server's own
    strategy registry (`resolve`), for strategies built on other strategies (`auto`, NBCE's rows)."""

    model: ModelFacts
    tokenize: Tokenize
    resolve: Callable[[StrategySpec], Strategy[Any]]
    # Server-side configuration strategies may read, keyed by what it is (e.g. "auto_policy": the
    # measured policy `auto` follows); set by the server, never by a request.
    options: Mapping[str, Any] = field(default_factory=dict)
    # Why the serving engine cannot run a RoPE configuration (None: it can), for strategies that
    # choose between others (`auto`); the default accepts everything.
    refuse_rope: Callable[[RopeConfig], str | None] = field(default=lambda rope: None)
    # Rows the engine runs in one step: the most rows a plan decoded in lockstep may have (None:
    # no limit), known before planning so that a strategy can count before it tokenizes.
    max_rows: int | None = None

    def with_tokenize(self, tokenize: Tokenize) -> PlanContext:
        return replace(self, tokenize=tokenize)


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

    @abstractmethod
    def plan(self, request: StrategyRequest, context: PlanContext) -> ExecutionPlan:
        """Build the execution plan, or raise StrategyError."""

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
