"""`self_extend`: Self-Extend (Jin et al. 2024, datamllab/LongLM): neighbour attention inside the window,
grouped attention beyond it.

A key at distance i - j >= W is scored at (i // G + W - W // G) - j // G: positions beyond the
neighbour window W are floor-divided by the group size G, then shifted so the two parts meet.
The largest distance a row of n tokens sees is (n - 1) // G + W - W // G, below the native window
L0 up to n = G (L0 - W + W // G). W must be a multiple of G (LongLM's prefill and decode paths
agree only then).

Defaults: LongLM sizes G so that the extended length holds the target (its README), so a request
without `group` gets the smallest of 4, 8, 16, ... that holds it (G = 4 retrieved best on the
bundled model); W defaults to a quarter of the native window (2048 on the bundled model; LongLM's
1024 was for a 4k Llama). No log-n, as LongLM.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from server.attention.self_extend import SelfExtend
from server.plan import ModelFacts
from strategies.base import StrategyError
from strategies.rope import logn_field
from strategies.window import WindowParams, WindowStrategy, window_field

SMALLEST_DEFAULT_GROUP = 4
MAX_GROUP = 256


class SelfExtendParams(WindowParams):
    window: int | None = window_field(
        "W: the neighbour window, exact relative positions below it (< the native window); "
        "default a quarter of the native window"
    )
    group: int | None = Field(
        default=None,
        ge=1,
        le=MAX_GROUP,
        description="G: beyond the window, positions are grouped by G; default the smallest of 4, 8, 16, ... "
        "whose length G (L0 - W + W / G) holds the request",
    )
    logn: bool = logn_field(False)

    @model_validator(mode="after")
    def _window_is_a_multiple_of_group(self) -> SelfExtendParams:
        if self.window is not None and self.group is not None and self.window % self.group:
            raise ValueError(f"window ({self.window}) must be a multiple of group ({self.group})")
        return self


def extended_length(window: int, group: int, model: ModelFacts) -> int:
    return group * (model.native_window - window + window // group)


class SelfExtendStrategy(WindowStrategy[SelfExtendParams]):
    name = "self_extend"
    description = (
        "Self-Extend: neighbour attention inside a window, grouped positions (floor(i / G)) beyond it "
        "(attention computed by the engine from the cached keys)."
    )
    Params = SelfExtendParams

    def settings(self, model: ModelFacts, needed: int) -> SelfExtendParams:
        window = self.params.window or model.native_window // 4
        group = self.params.group
        if group is None:
            group = SMALLEST_DEFAULT_GROUP
            while group < MAX_GROUP and extended_length(window, group, model) < needed:
                group *= 2
            if window % group:
                raise StrategyError(
                    f"strategy.window: {window} must be a multiple of the group size {group} that holds "
                    f"{needed} tokens; give `group` too",
                    field="strategy.window",
                )
        return self.params.model_copy(update={"window": window, "group": group})

    def scheme(self, p: SelfExtendParams, model: ModelFacts) -> SelfExtend:
        assert p.window is not None and p.group is not None
        return SelfExtend(window=p.window, group=p.group, logn_window=self.logn_window(p, model))

    def longest(self, p: SelfExtendParams, model: ModelFacts) -> int | None:
        assert p.window is not None and p.group is not None
        return extended_length(p.window, p.group, model)
