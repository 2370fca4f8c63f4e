"""`llama3`: Llama-3.1 style frequency-dependent interpolation."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from server.plan import ModelFacts
from strategies.rope import RopeParams, RopeStrategy, factor_field


class Llama3Params(RopeParams):
    factor: float = factor_field(4.0)
    low_freq_factor: float = Field(
        default=1.0, gt=0, le=1024, description="wavelengths above original/low_freq_factor are divided by factor"
    )
    high_freq_factor: float = Field(
        default=4.0, gt=0, le=1024, description="wavelengths below original/high_freq_factor are kept"
    )
    original_max_position_embeddings: int | None = Field(
        default=None, ge=16, le=1_048_576, description="the pretraining window; default: the model's native window"
    )

    @model_validator(mode="after")
    def _order(self) -> Llama3Params:
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError("high_freq_factor must be greater than low_freq_factor")
        return self


class Llama3Strategy(RopeStrategy[Llama3Params]):
    name = "llama3"
    description = (
        "Llama-3.1 scaling: long wavelengths interpolated by `factor`, short ones kept, smooth in "
        "between (low_freq_factor, high_freq_factor); allows factor x the native window."
    )
    Params = Llama3Params

    def rope_parameters(self, model: ModelFacts) -> dict[str, Any]:
        p = self.params
        return {
            **self.base_parameters(model),
            "rope_type": "llama3",
            "factor": float(p.factor),
            "low_freq_factor": float(p.low_freq_factor),
            "high_freq_factor": float(p.high_freq_factor),
            "original_max_position_embeddings": int(p.original_max_position_embeddings or model.native_window),
        }
