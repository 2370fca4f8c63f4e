"""`String`: STRING (An et al. 2024, "Why Does the Effective Context Length of LLMs Fall Short?",
HKUNLP/STRING `string_for_llama.py`): the largest relative positions, which pretraining saw least,
are dropped and the well-trained ones shifted over them. A pair at distance d = i - j is scored at

    d                  while d < S           (the near band: exact positions)
    d - S + W          from S on             (shifted: the query at i - S + W, the key at j)
    C                  once d - S + W >= C   (capped, when `cap` is set: the query at C, the key at 0)

S the shifted offset, W the small local value that the shifted part starts from (so the farthest
keys are never scored as if they were the nearest). The cap is not in the paper, whose code
extends no further than S - W positions past the trained length: clamped there as ReRoPE clamps,
no distance ever exceeds C, so a row may be as long as the KV cache holds.

STRING also multiplies every cos/sin by `attention_factor` (0.1 ln 2 + 1, "similar to YaRN"), so
every logit is scaled by its square: applied here as a query scale.

    >>> scheme = String(shift=6, local_window=2, cap=5)
    >>> [scheme.relative(d) for d in range(12)]
    [0, 1, 2, 3, 4, 5, 2, 3, 4, 5, 5, 5]
    >>> scheme.label(), scheme.max_distance(100)
    ('string-s6-w2-c5', 5.0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from server.attention.banded import Band, BandedScheme

PAPER_ATTENTION_FACTOR = 0.1 * math.log(2) + 1


@dataclass(frozen=True)
class String(BandedScheme):
    shift: int
    local_window: int
    cap: int | None = None
    attention_factor: float = PAPER_ATTENTION_FACTOR

    kind: ClassVar[str] = "string"

    def relative(self, d: int) -> int:
        """The relative position a pair at distance d is scored at (the rule above, one pair)."""
        if d < self.shift:
            return d
        shifted = d - self.shift + self.local_window
        return shifted if self.cap is None else min(shifted, self.cap)

    def far_bands(self) -> tuple[Band, ...]:
        offset = self.shift - self.local_window
        shifted = Band(self.shift, lambda i: i - offset, far=False)
        if self.cap is None:
            return (shifted,)
        cap = float(self.cap)
        return shifted, Band(self.cap + offset, lambda i: torch.full_like(i, cap), far=True)

    def far_key(self, j: torch.Tensor) -> torch.Tensor | None:
        return None if self.cap is None else torch.zeros_like(j)

    def query_scale(self, positions: torch.Tensor, length: int) -> torch.Tensor | None:
        if self.attention_factor == 1.0:
            return None
        return torch.full(positions.shape, self.attention_factor**2, dtype=torch.float64)

    def max_distance(self, n: int) -> float:
        return float(self.relative(n - 1))

    def label(self) -> str:
        cap = "" if self.cap is None else f"-c{self.cap}"
        factor = "" if self.attention_factor == PAPER_ATTENTION_FACTOR else f"-f{self.attention_factor:g}"
        return f"string-s{self.shift}-w{self.local_window}{cap}{factor}"
