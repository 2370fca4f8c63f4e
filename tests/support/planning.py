"""Planning a strategy outside the server: the same PlanContext the service builds."""

from __future__ import annotations

from server.engines.base import ExecutionPlan
from server.plan import ModelFacts
from strategies.base import PlanContext, StrategyRequest, StrategySpec, Tokenize
from strategies.registry import StrategyRegistry, default_registry


def plan_context(model: ModelFacts, tokenize: Tokenize, registry: StrategyRegistry | None = None) -> PlanContext:
    registry = registry or default_registry()
    return PlanContext(model=model, tokenize=tokenize, resolve=registry.resolve)


def plan_for(
    spec: StrategySpec,
    request: StrategyRequest,
    model: ModelFacts,
    tokenize: Tokenize,
    registry: StrategyRegistry | None = None,
) -> ExecutionPlan:
    context = plan_context(model, tokenize, registry)
    return context.resolve(spec).plan(request, context)
