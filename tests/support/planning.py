"""Planning a strategy outside the server, as the service does: the request's texts as the strategy
reads them, tokenized (server/service/prompt_tokens.py), then planned from the same PlanContext."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from server.engines.base import ExecutionPlan
from server.plan import ModelFacts
from server.service.prompt_tokens import PromptTokenizer
from strategies.base import PlanContext, Strategy, StrategyRequest, StrategySpec
from strategies.registry import StrategyRegistry, default_registry

# A tokenizer (Hugging Face's, or one with its `encode`), or a function of a text to its ids.
AnyTokenizer = Any


class FunctionTokenizer:
    """A function of a text to its ids, as a tokenizer: no special tokens, and its ids' end offsets
    spread evenly over the text (server/service/prompt_tokens.py: `encode`)."""

    all_special_ids: list[int] = []

    def __init__(self, tokenize: Callable[[str], list[int]]) -> None:
        self.tokenize = tokenize

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenize(text))


def prompt_tokenizer(tokenizer: AnyTokenizer) -> PromptTokenizer:
    return PromptTokenizer(tokenizer if hasattr(tokenizer, "encode") else FunctionTokenizer(tokenizer))


def tokenized(
    strategy: Strategy[Any], request: StrategyRequest, context: PlanContext, tokenizer: AnyTokenizer
) -> StrategyRequest:
    """`request` as `strategy` reads it, with its token ids (what the service hands `plan`)."""
    read = strategy.prompt_texts(request, context)
    ids = None if read.token_ids is None else list(read.token_ids)
    return replace(read, tokens=prompt_tokenizer(tokenizer).tokens(read.inputs, read.documents, ids))


def plan_context(model: ModelFacts, registry: StrategyRegistry | None = None) -> PlanContext:
    return PlanContext(model=model, registry=registry or default_registry())


def plan_with(
    context: PlanContext, spec: StrategySpec, request: StrategyRequest, tokenizer: AnyTokenizer
) -> ExecutionPlan:
    strategy = context.resolve(spec)
    return strategy.plan(tokenized(strategy, request, context, tokenizer), context)


def plan_for(
    spec: StrategySpec,
    request: StrategyRequest,
    model: ModelFacts,
    tokenizer: AnyTokenizer,
    registry: StrategyRegistry | None = None,
) -> ExecutionPlan:
    return plan_with(plan_context(model, registry), spec, request, tokenizer)
