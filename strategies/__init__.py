"""Long-context strategies: small classes behind one interface, registered by name."""

from strategies.base import (
    ExecutionPlan,
    ModelFacts,
    RopeConfig,
    Strategy,
    StrategyError,
    StrategyRequest,
)
from strategies.registry import StrategyRegistry, default_registry

__all__ = [
    "ExecutionPlan",
    "ModelFacts",
    "RopeConfig",
    "Strategy",
    "StrategyError",
    "StrategyRegistry",
    "StrategyRequest",
    "default_registry",
]
