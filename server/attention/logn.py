"""`LogN`: log-n attention scaling (bojone's ReRoPE patches; LongLM's `scale_base`): the query at
position i is multiplied by max(1, ln(i + 1) / ln L0), L0 the trained window, so that attention stays
as sharp past L0 as the model learned it within.

Alone (a RoPE scaling with `"logn": true`) the scheme only scales queries and vLLM's kernel runs the
row; window schemes carry the same factor through their `logn_window` field.

    >>> LogN(window=4).query_scale(torch.tensor([0, 3, 15]), 16).tolist()
    [1.0, 1.0, 2.0]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from server.plan import AttentionScheme


def logn_scale(window: int | None, positions: torch.Tensor) -> torch.Tensor | None:
    """max(1, ln(i + 1) / ln L0) per position (float64), or None when log-n is off (no window)."""
    if window is None:
        return None
    return (torch.log(positions.to(torch.float64) + 1) / math.log(window)).clamp(min=1.0)


@dataclass(frozen=True)
class LogN(AttentionScheme):
    window: int

    kind: ClassVar[str] = "logn"
    computes_attention: ClassVar[bool] = False

    def label(self) -> str:
        return "logn"

    def max_distance(self, n: int) -> float:
        return float(n - 1)

    def query_scale(self, positions: torch.Tensor, length: int) -> torch.Tensor | None:
        return logn_scale(self.window, positions)
