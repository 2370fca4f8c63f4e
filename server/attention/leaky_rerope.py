"""`LeakyRerope`: Leaky ReRoPE (bojone/rerope `leaky_rerope_patch.py`): beyond the window w a
relative position d is scored at w + (d - w)/k — the far query at w - w/k + i/k, the far key at j/k.

    >>> scheme = LeakyRerope(window=4, leak=2.0)
    >>> scheme.far_query(torch.tensor([10.0])) - scheme.far_key(torch.tensor([0.0]))
    tensor([7.])
    >>> scheme.label()
    'leaky_rerope-w4-k2'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from server.attention.banded import TwoBandScheme


@dataclass(frozen=True)
class LeakyRerope(TwoBandScheme):
    window: int
    leak: float
    logn_window: int | None = None

    kind: ClassVar[str] = "leaky_rerope"

    def far_query(self, i: torch.Tensor) -> torch.Tensor:
        w = float(self.window)
        return w - w / self.leak + i / self.leak

    def far_key(self, j: torch.Tensor) -> torch.Tensor:
        return j / self.leak

    def max_distance(self, n: int) -> float:
        d = n - 1
        return float(d) if d < self.window else self.window + (d - self.window) / self.leak

    def label(self) -> str:
        return f"leaky_rerope-w{self.window}-k{self.leak:g}{self.logn_label()}"
