"""`Rerope`: ReRoPE (Su Jianlin, bojone/rerope `rerope_patch.py`): beyond the window w every
relative position is clamped to w — the far query at w, the far key unrotated (position 0).

    >>> scheme = Rerope(window=4)
    >>> scheme.far_query(torch.tensor([9.0])) - scheme.far_key(torch.tensor([2.0]))
    tensor([4.])
    >>> scheme.label(), scheme.max_distance(100)
    ('rerope-w4', 4.0)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from server.attention.banded import TwoBandScheme


@dataclass(frozen=True)
class Rerope(TwoBandScheme):
    window: int
    logn_window: int | None = None

    kind: ClassVar[str] = "rerope"

    def far_query(self, i: torch.Tensor) -> torch.Tensor:
        return torch.full_like(i, float(self.window))

    def far_key(self, j: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(j)

    def max_distance(self, n: int) -> float:
        return float(min(n - 1, self.window))

    def label(self) -> str:
        return f"rerope-w{self.window}{self.logn_label()}"
