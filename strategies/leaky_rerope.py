"""`leaky_rerope`: Leaky ReRoPE (bojone/rerope): beyond the window, relative positions grow with slope 1/k.

A score at distance i - j >= w sees w + (i - j - w)/k, so distances stay below the native window L0
for rows up to w + k (L0 - 1 - w) + 1. k = 16 and log-n as in bojone's patch; its w = 512 was for
a 4k Llama, so the default w is half the model's native window (w = 4096 on the bundled model: 4/5
passkeys at 12k and 16k).
"""

from __future__ import annotations

import math

from pydantic import Field

from server.attention.leaky_rerope import LeakyRerope
from server.plan import ModelFacts
from strategies.rope import logn_field
from strategies.window import WindowParams, WindowStrategy, window_field


class LeakyReropeParams(WindowParams):
    window: int | None = window_field(
        "w: exact relative positions below it (< the native window); default half the native window"
    )
    leak: float = Field(default=16.0, ge=1.0, le=1024.0, description="k: beyond the window, positions grow by 1/k")
    logn: bool = logn_field(True)


class LeakyReropeStrategy(WindowStrategy[LeakyReropeParams]):
    name = "leaky_rerope"
    description = (
        "Leaky ReRoPE: exact relative positions inside a window, growing with slope 1/k beyond it "
        "(attention computed by the engine from the cached keys)."
    )
    Params = LeakyReropeParams

    def settings(self, model: ModelFacts, needed: int) -> LeakyReropeParams:
        return self.params.model_copy(update={"window": self.params.window or model.native_window // 2})

    def scheme(self, p: LeakyReropeParams, model: ModelFacts) -> LeakyRerope:
        assert p.window is not None
        return LeakyRerope(window=p.window, leak=p.leak, logn_window=self.logn_window(p, model))

    def longest(self, p: LeakyReropeParams, model: ModelFacts) -> int | None:
        assert p.window is not None
        return p.window + math.floor(p.leak * (model.native_window - 1 - p.window)) + 1
