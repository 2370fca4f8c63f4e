"""`self_extend`: Self-Extend (Jin et al. 2024, datamllab/LongLM): neighbour attention inside the window,
grouped attention beyond it.

A key at distance i - j >= W is scored at (i // G + W - W // G) - j // G: positions beyond the
neighbour window W are floor-divided by the group size G, then shifted so the two parts meet.
The largest distance a row of n tokens sees is (n - 1) // G + W - W // G, below the native window
L0 up to n = G (L0 - W + W // G). Defaults as in LongLM: G = 8, W = 1024, no log-n. W must be a
multiple of G (LongLM's prefill and decode paths agree only then).
"""

from __future__ import annotations

from pydantic import Field, model_validator

from server.engines.base import AttentionScheme
from strategies.base import ModelFacts
from strategies.rope import logn_field
from strategies.window import WindowParams, WindowStrategy, window_field


class SelfExtendParams(WindowParams):
    window: int = window_field(1024, "W: the neighbour window, exact relative positions below it (< the native window)")
    group: int = Field(default=8, ge=1, le=256, description="G: beyond the window, positions are grouped by G")
    logn: bool = logn_field(False)

    @model_validator(mode="after")
    def _window_is_a_multiple_of_group(self) -> SelfExtendParams:
        if self.window % self.group:
            raise ValueError(f"window ({self.window}) must be a multiple of group ({self.group})")
        return self


class SelfExtendStrategy(WindowStrategy[SelfExtendParams]):
    name = "self_extend"
    description = (
        "Self-Extend: neighbour attention inside a window, grouped positions (floor(i / G)) beyond it "
        "(attention computed by the engine from unrotated cached keys)."
    )
    Params = SelfExtendParams

    def scheme(self, model: ModelFacts) -> AttentionScheme:
        p = self.params
        return AttentionScheme("self_extend", window=p.window, group=p.group, logn_window=self.logn_window(model))

    def longest(self, model: ModelFacts) -> int | None:
        p = self.params
        return p.group * (model.native_window - p.window + p.window // p.group)
