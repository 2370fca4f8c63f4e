"""`linear`: position interpolation (Chen et al. 2023): positions are divided by `factor`."""

from __future__ import annotations

from typing import Any

from server.plan import ModelFacts
from strategies.rope import RopeParams, RopeStrategy, factor_field


class LinearParams(RopeParams):
    factor: float = factor_field(2.0)


class LinearStrategy(RopeStrategy[LinearParams]):
    name = "linear"
    description = (
        "Position interpolation: every position is divided by `factor`; allows factor x the native "
        "window. Without fine-tuning the bundled model does not retrieve with it (see README)."
    )
    Params = LinearParams

    def rope_parameters(self, model: ModelFacts) -> dict[str, Any]:
        return {**self.base_parameters(model), "rope_type": "linear", "factor": float(self.params.factor)}
