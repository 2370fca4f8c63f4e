"""Long-context strategies: small classes behind one interface, registered by name."""

from server.plan import ModelFacts, RopeConfig
from strategies.base import ExecutionPlan, Strategy, StrategyError, StrategyRequest
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
