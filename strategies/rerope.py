"""`rerope`: ReRoPE (Su Jianlin, bojone/rerope): relative positions beyond the window are clamped to it.

Inside the window (i - j < w) a score sees i - j; beyond, w. No distance exceeds w, so any length
the KV cache holds is in the trained range. Log-n on by default, as in bojone's patch. bojone's
w = 512 was for a 4k Llama; on the bundled model (L0 = 8192) w = 512 missed passkeys that
w = 4096 found (4/5 at 12k-32k), so the default is half the model's native window.
"""

from __future__ import annotations

from server.attention.rerope import Rerope
from server.plan import ModelFacts
from strategies.rope import logn_field
from strategies.window import WindowParams, WindowStrategy, window_field


class ReropeParams(WindowParams):
    window: int | None = window_field(
        "w: exact relative positions below it, w beyond (< the native window); default half the native window"
    )
    logn: bool = logn_field(True)


class ReropeStrategy(WindowStrategy[ReropeParams]):
    name = "rerope"
    description = (
        "ReRoPE: exact relative positions inside a window, clamped to the window beyond it "
        "(attention computed by the engine from the cached keys)."
    )
    Params = ReropeParams

    def settings(self, model: ModelFacts, needed: int) -> ReropeParams:
        return self.params.model_copy(update={"window": self.params.window or model.native_window // 2})

    def scheme(self, p: ReropeParams, model: ModelFacts) -> Rerope:
        assert p.window is not None
        return Rerope(window=p.window, logn_window=self.logn_window(p, model))

    def longest(self, p: ReropeParams, model: ModelFacts) -> int | None:
        return None
