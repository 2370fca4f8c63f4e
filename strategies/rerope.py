"""`rerope`: ReRoPE (Su Jianlin, bojone/rerope): relative positions beyond the window are clamped to it.

Inside the window (i - j < w) a score sees i - j; beyond, w. No distance exceeds w, so any length
the KV cache holds is in the trained range. Defaults as in bojone's patch: w = 512 with log-n.
"""

from __future__ import annotations

from server.engines.base import AttentionScheme
from strategies.base import ModelFacts
from strategies.rope import logn_field
from strategies.window import WindowParams, WindowStrategy, window_field


class ReropeParams(WindowParams):
    window: int = window_field(512, "w: exact relative positions below it, w beyond (< the native window)")
    logn: bool = logn_field(True)


class ReropeStrategy(WindowStrategy[ReropeParams]):
    name = "rerope"
    description = (
        "ReRoPE: exact relative positions inside a window, clamped to the window beyond it "
        "(attention computed by the engine from unrotated cached keys)."
    )
    Params = ReropeParams

    def scheme(self, model: ModelFacts) -> AttentionScheme:
        return AttentionScheme("rerope", window=self.params.window, logn_window=self.logn_window(model))

    def longest(self, model: ModelFacts) -> int | None:
        return None
