"""`leaky_rerope`: Leaky ReRoPE (bojone/rerope): beyond the window, relative positions grow with slope 1/k.

A score at distance i - j >= w sees w + (i - j - w)/k, so distances stay below the native window L0
for rows up to w + k (L0 - 1 - w) + 1. Defaults as in bojone's patch: w = 512, k = 16, log-n on.
"""

from __future__ import annotations

import math

from pydantic import Field

from server.engines.base import AttentionScheme
from strategies.base import ModelFacts
from strategies.rope import logn_field
from strategies.window import WindowParams, WindowStrategy, window_field


class LeakyReropeParams(WindowParams):
    window: int = window_field(512, "w: exact relative positions below it (< the native window)")
    leak: float = Field(default=16.0, ge=1.0, le=1024.0, description="k: beyond the window, positions grow by 1/k")
    logn: bool = logn_field(True)


class LeakyReropeStrategy(WindowStrategy[LeakyReropeParams]):
    name = "leaky_rerope"
    description = (
        "Leaky ReRoPE: exact relative positions inside a window, growing with slope 1/k beyond it "
        "(attention computed by the engine from unrotated cached keys)."
    )
    Params = LeakyReropeParams

    def scheme(self, model: ModelFacts) -> AttentionScheme:
        p = self.params
        return AttentionScheme("leaky_rerope", window=p.window, leak=p.leak, logn_window=self.logn_window(model))

    def longest(self, model: ModelFacts) -> int | None:
        p = self.params
        return p.window + math.floor(p.leak * (model.native_window - 1 - p.window)) + 1
