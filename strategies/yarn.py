"""`yarn`: YaRN (Peng et al. 2023): per-frequency interpolation ramp plus attention temperature."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from server.plan import ModelFacts
from strategies.rope import RopeParams, RopeStrategy, factor_field


class YarnParams(RopeParams):
    factor: float = factor_field(2.0)
    beta_fast: float = Field(
        default=32.0, gt=0, le=1024, description="rotations above which a dimension is extrapolated"
    )
    beta_slow: float = Field(
        default=1.0, gt=0, le=1024, description="rotations below which a dimension is interpolated"
    )
    attention_factor: float | None = Field(
        default=None, gt=0, le=4, description="cos/sin magnitude (attention temperature); default 0.1 ln(factor) + 1"
    )
    mscale: float | None = Field(default=None, gt=0, le=16, description="DeepSeek-style mscale (with mscale_all_dim)")
    mscale_all_dim: float | None = Field(default=None, gt=0, le=16, description="DeepSeek-style mscale_all_dim")

    @model_validator(mode="after")
    def _betas(self) -> YarnParams:
        if self.beta_fast <= self.beta_slow:
            raise ValueError("beta_fast must be greater than beta_slow")
        return self


class YarnStrategy(RopeStrategy[YarnParams]):
    name = "yarn"
    description = (
        "YaRN: high frequencies kept, low frequencies interpolated by `factor`, a linear ramp between "
        "(beta_fast, beta_slow rotations), cos/sin scaled by attention_factor; allows factor x the native window."
    )
    Params = YarnParams

    def rope_parameters(self, model: ModelFacts) -> dict[str, Any]:
        p = self.params
        params: dict[str, Any] = {
            **self.base_parameters(model),
            "rope_type": "yarn",
            "factor": float(p.factor),
            "original_max_position_embeddings": model.native_window,
            "beta_fast": float(p.beta_fast),
            "beta_slow": float(p.beta_slow),
        }
        for key in ("attention_factor", "mscale", "mscale_all_dim"):
            if getattr(p, key) is not None:
                params[key] = float(getattr(p, key))
        return params
