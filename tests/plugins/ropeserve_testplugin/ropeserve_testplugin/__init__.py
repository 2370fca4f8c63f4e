"""A third-party strategy registered through the `ropeserve.strategies` entry point."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from strategies.base import ModelFacts
from strategies.rope import RopeParams, RopeStrategy


class ShiftedThetaParams(RopeParams):
    theta_multiplier: float = Field(default=8.0, ge=1.0, le=64.0)


class ShiftedThetaStrategy(RopeStrategy):
    name = "shifted_theta"
    description = "Test plugin: RoPE base multiplied by a constant."
    Params = ShiftedThetaParams

    def rope_parameters(self, model: ModelFacts) -> dict[str, Any]:
        theta = model.rope_theta * self.params.theta_multiplier
        return {**self.base_parameters(model), "rope_type": "default", "rope_theta": theta}
