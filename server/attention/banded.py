"""`BandedScheme`: the base of the schemes that score a (query i, key j) pair by how far apart they
are: ordinary RoPE in the near band i - j < `window`, and in each farther band the query rotated at
the band's a(i) against the key at its own position j or at the scheme's far position b(j). ReRoPE,
Leaky ReRoPE and Self-Extend have two bands (`TwoBandScheme`); STRING has two or three. A subclass
is its fields, its bands, its far key position, its bound and its label; the attention is this
module's.

Rotations compose, so a band's query is the query rotated on by a(i) - i and the far key the key
rotated on by b(j) - j (once per key: the engine's row copies keep them). Rather than a score matrix
per band and a `where` (the papers' code; O(C x n) memory, 7 s for 256 x 24k here), the keys of a
block of queries [first, last] (at most as many as the narrowest band is wide) split into sets that
fused attention handles without materialising scores. For a band of distances [lo, hi):

| keys                                   | mask                                 |
|----------------------------------------|--------------------------------------|
| last - hi < j <= first - lo (j < first) | none: in the band for every query    |
| first - hi < j <= last - lo, the rest  | in the band: lo <= i - j < hi        |

and the block itself (first <= j <= last) is causal, in the near band. The sets merge by their
log-sum-exp (fused.py), so the cost is one plain attention over the row plus two block x block masked
scores per band edge; no key is rotated per call. GQA is folded into the query length (each KV
head's query heads one after another), so no key is repeated.

    >>> from server.attention.rerope import Rerope
    >>> from server.attention.rotary import inverse_frequencies
    >>> from server.plan import RowKV
    >>> q, k, v = torch.randn(4, 2, 8), torch.randn(1, 10, 8), torch.randn(1, 10, 8)
    >>> scheme, inv_freq = Rerope(window=3), inverse_frequencies(1e4, 8)
    >>> row = RowKV(k, v, scheme.far_keys(k, 0, inv_freq))
    >>> scheme.attend(q, row, 6, inv_freq, 8**-0.5).shape
    torch.Size([4, 2, 8])
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch

from server.attention.fused import attend, fold_heads, merge, unfold_heads
from server.attention.logn import logn_scale
from server.attention.rotary import rotate
from server.plan import AttentionScheme, RowKV

# Queries per block (and at most the narrowest band): bounds the masked parts at QUERY_BLOCK^2 per group.
QUERY_BLOCK = 512

Positions = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Band:
    """Pairs at distance i - j >= `start` (up to the next band's start), scored with the query
    rotated at `query(i)` against the row's far keys (`far`) or its keys as cached."""

    start: int
    query: Positions
    far: bool


class BandedScheme(AttentionScheme):
    """Ordinary RoPE in the near band; the scheme's own positions in the bands beyond it."""

    @abstractmethod
    def far_bands(self) -> tuple[Band, ...]:
        """The bands past the near one, nearest first; the first's start ends the near band."""

    def far_key(self, j: torch.Tensor) -> torch.Tensor | None:
        """b(j): where the far bands' keys sit for a key at position j (float64); None: keys stay
        where the cache holds them (no far keys are kept)."""
        return None

    def far_keys(self, keys: torch.Tensor, first: int, inv_freq: torch.Tensor) -> torch.Tensor | None:
        positions = torch.arange(first, first + keys.shape[1], dtype=torch.float64)
        far = self.far_key(positions)
        return None if far is None else rotate(keys, far - positions, inv_freq)

    def attend(self, q: torch.Tensor, row: RowKV, first: int, inv_freq: torch.Tensor, scale: float) -> torch.Tensor:
        num_queries = q.shape[0]
        if row.keys.shape[1] != first + num_queries:
            raise ValueError(f"{row.keys.shape[1]} keys for queries at {first}..{first + num_queries - 1}")
        bands = (Band(0, _own, far=False), *self.far_bands())
        narrowest = min(b.start - a.start for a, b in zip(bands, bands[1:], strict=False))
        block = max(1, min(QUERY_BLOCK, narrowest))
        out = torch.empty_like(q)
        for start in range(0, num_queries, block):
            stop = min(start + block, num_queries)
            out[start:stop] = _block(q[start:stop], row, first + start, bands, inv_freq, scale)
        return out


class TwoBandScheme(BandedScheme):
    """The near band i - j < `window`, and one far band beyond: the query at a(i), the key at b(j).

    Subclasses are frozen dataclasses with a `window` field and `logn_window` (log-n, or None)."""

    window: int
    logn_window: int | None

    @abstractmethod
    def far_query(self, i: torch.Tensor) -> torch.Tensor:
        """a(i): where a query at position i (float64) is rotated for keys beyond the window."""

    @abstractmethod
    def far_key(self, j: torch.Tensor) -> torch.Tensor:
        """b(j): where a key at position j (float64) is rotated for queries beyond the window."""

    def far_bands(self) -> tuple[Band, ...]:
        return (Band(self.window, self.far_query, far=True),)

    def query_scale(self, positions: torch.Tensor, length: int) -> torch.Tensor | None:
        return logn_scale(self.logn_window, positions)

    def logn_label(self) -> str:
        return "-logn" if self.logn_window is not None else ""


def _own(i: torch.Tensor) -> torch.Tensor:
    return i


def _block(
    q: torch.Tensor, row: RowKV, first: int, bands: tuple[Band, ...], inv_freq: torch.Tensor, scale: float
) -> torch.Tensor:
    """Queries first..last of the row (fewer than the narrowest band is wide)."""
    k, v, k_far = row
    c, heads, d = q.shape
    kv_heads = k.shape[0]
    group = heads // kv_heads
    last = first + c - 1
    positions = torch.arange(first, first + c, dtype=torch.float64)
    by_head = q.transpose(0, 1)
    parts = []
    for band, following in zip(bands, (*bands[1:], None), strict=True):
        lo, hi = band.start, (None if following is None else following.start)
        # Keys before the block in the band for every query of it, and for some (j in [lo_j, hi_j]).
        every = (0 if hi is None else max(0, last - hi + 1), first - max(lo, 1))
        some = (0 if hi is None else max(0, first - hi + 1), min(first - 1, last - lo))
        if some[0] > some[1]:
            continue
        rotated = by_head if band.query is _own else rotate(by_head, band.query(positions) - positions, inv_freq)
        q_band = fold_heads(rotated, kv_heads)[None]
        keys = k_far if band.far else k
        if every[0] <= every[1]:
            span = slice(every[0], every[1] + 1)
            parts.append(attend(q_band, keys[None, :, span], v[None, :, span], scale))
            edges = [(some[0], every[0] - 1), (every[1] + 1, some[1])]
        else:
            edges = [some]
        for lo_j, hi_j in edges:
            if lo_j > hi_j:
                continue
            distance = positions[:, None] - torch.arange(lo_j, hi_j + 1, dtype=torch.float64)[None, :]
            inside = (distance >= lo) if hi is None else (distance >= lo) & (distance < hi)
            span = slice(lo_j, hi_j + 1)
            parts.append(_masked(q_band, keys[None, :, span], v[None, :, span], inside, group, scale))
    # The block against itself, causal: per query head, so that the mask lines up with the keys.
    own_k = k[:, first : last + 1].repeat_interleave(group, 0)[None]
    own_v = v[:, first : last + 1].repeat_interleave(group, 0)[None]
    out, lse = attend(by_head[None], own_k, own_v, scale, causal=c > 1)
    parts.append((out.reshape(1, kv_heads, group * c, d), lse.reshape(1, kv_heads, group * c)))
    return unfold_heads(merge(parts)[0].to(q.dtype), c)


def _masked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, group: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused attention where `allowed` [c, keys] (per query position, repeated for the group's
    heads); queries with no allowed key get log-sum-exp -inf (the op would say 0)."""
    allowed = allowed.repeat(group, 1).to(q.device)
    mask = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(~allowed, float("-inf"))
    out, lse = attend(q, k, v, scale, mask=mask[None, None])
    return out, lse.masked_fill(~allowed.any(-1)[None, None], float("-inf"))
