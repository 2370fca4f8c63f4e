"""`ntk`: NTK-aware scaling, a larger RoPE base: theta' = theta * factor^(d/(d-2))."""

from __future__ import annotations

from typing import Any

from server.plan import ModelFacts
from strategies.rope import RopeParams, RopeStrategy, factor_field, ntk_theta


class NtkParams(RopeParams):
    factor: float = factor_field(4.0)


class NtkStrategy(RopeStrategy[NtkParams]):
    name = "ntk"
    description = (
        "NTK-aware scaling: the RoPE base becomes theta * factor^(d/(d-2)) (d = head dim), which "
        "stretches low frequencies and keeps high ones; allows factor x the native window."
    )
    Params = NtkParams

    def rope_parameters(self, model: ModelFacts) -> dict[str, Any]:
        theta = ntk_theta(model.rope_theta, self.params.factor, model.head_dim)
        return {**self.base_parameters(model), "rope_type": "default", "rope_theta": theta}
