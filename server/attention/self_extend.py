"""`SelfExtend`: Self-Extend (Jin et al. 2024, datamllab/LongLM `self_extend_forward`): neighbour
attention inside the window W, grouped attention beyond it — the far query at i // G + W - W // G,
the far key at j // G (W a multiple of G, where LongLM's prefill and decode paths agree).

    >>> scheme = SelfExtend(window=4, group=2)
    >>> scheme.far_query(torch.tensor([10.0])) - scheme.far_key(torch.tensor([0.0, 4.0]))
    tensor([7., 5.])
    >>> scheme.label(), scheme.max_distance(11)
    ('self_extend-w4-g2', 7.0)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from server.attention.banded import TwoBandScheme


@dataclass(frozen=True)
class SelfExtend(TwoBandScheme):
    window: int
    group: int
    logn_window: int | None = None

    kind: ClassVar[str] = "self_extend"

    def far_query(self, i: torch.Tensor) -> torch.Tensor:
        return torch.floor(i / self.group) + (self.window - self.window // self.group)

    def far_key(self, j: torch.Tensor) -> torch.Tensor:
        return torch.floor(j / self.group)

    def max_distance(self, n: int) -> float:
        d = n - 1
        return float(d) if d < self.window else float(d // self.group + self.window - self.window // self.group)

    def label(self) -> str:
        return f"self_extend-w{self.window}-g{self.group}{self.logn_label()}"
