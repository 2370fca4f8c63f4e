"""Two-band attention: one row's attention under a window scheme, from unrotated queries and keys.

A query at position i scores key j with ordinary RoPE while i - j < w (the band) and with the
scheme's far rotations beyond it: q at a(i), k at b(j) (positions.py). Rather than two full score
matrices and a `where` (the papers' code; O(C x n) memory, 7 s for 256 x 24k here), the keys of a block
of queries split into three sets that fused attention handles without materialising scores:

- far for every query of the block (j <= i_first - w): unmasked, q at a(i), k at b(j);
- far for some (i_first - w < j <= i_last - w, at most a block's worth): the same, masked;
- in the band for some (i_first - w < j <= i_last): q at i, k at j, masked to 0 <= i - j < w.

The sets merge by their log-sum-exp, so the cost is one plain attention over the row plus
block x (w + block) scores. GQA is folded into the query length (each KV head's
query heads one after another), so no key is repeated.

    >>> from server.engines.base import AttentionScheme
    >>> from server.engines.window_attention.positions import inverse_frequencies
    >>> q, k, v = torch.randn(4, 2, 8), torch.randn(1, 10, 8), torch.randn(1, 10, 8)
    >>> scheme = AttentionScheme("rerope", window=3)
    >>> two_band_attention(q, k, v, 6, scheme, inverse_frequencies(1e4, 8), 8**-0.5).shape
    torch.Size([4, 2, 8])
"""

from __future__ import annotations

import functools

import torch

from server.engines.base import AttentionScheme
from server.engines.window_attention.fused import attend, fold_heads, merge, unfold_heads
from server.engines.window_attention.positions import logn_scale, outside_positions, rotate
from server.engines.window_attention.row_cache import FarKeys

# Queries per fused call: bounds the band part's mask at QUERY_BLOCK x (w + QUERY_BLOCK) per group.
QUERY_BLOCK = 256


def two_band_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    first_position: int,
    scheme: AttentionScheme,
    inv_freq: torch.Tensor,
    scale: float,
    k_far: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of queries q [C, heads, d] at positions first_position.. over the row's keys and
    values k, v [kv_heads, n, d] at positions 0..n-1 (n = first_position + C), all unrotated;
    `k_far`: the keys already rotated at b(j) (`far_keys`), if the caller keeps them.
    Returns [C, heads, d] in q's dtype."""
    num_queries = q.shape[0]
    n = k.shape[1]
    if n != first_position + num_queries:
        raise ValueError(f"{n} keys for queries at {first_position}..{first_position + num_queries - 1}")
    if k_far is None:
        k_far = far_keys(k, 0, scheme, inv_freq)
    out = torch.empty_like(q)
    for start in range(0, num_queries, QUERY_BLOCK):
        stop = min(start + QUERY_BLOCK, num_queries)
        out[start:stop] = _block(q[start:stop], k, k_far, v, first_position + start, scheme, inv_freq, scale)
    return out


def far_rotation(scheme: AttentionScheme, inv_freq: torch.Tensor) -> FarKeys | None:
    """`far_keys` for this scheme, for the row copies to apply to each appended key; None for
    rerope, whose far keys are the unrotated keys themselves (nothing to keep twice), and for DCA,
    whose keys the paged cache already holds rotated where every part reads them."""
    if scheme.kind in ("rerope", "dca"):
        return None
    return functools.partial(far_keys, scheme=scheme, inv_freq=inv_freq)


def far_keys(k: torch.Tensor, first_position: int, scheme: AttentionScheme, inv_freq: torch.Tensor) -> torch.Tensor:
    """Keys k [kv_heads, m, d] at positions first_position.. rotated at b(j), their far position;
    rerope's b is 0, so its keys are returned as they are."""
    if scheme.kind == "rerope":
        return k
    positions = torch.arange(first_position, first_position + k.shape[1], dtype=torch.float64)
    _, b = outside_positions(scheme, positions[:1], positions)
    return rotate(k, b, inv_freq)


def _block(
    q: torch.Tensor,
    k: torch.Tensor,
    k_far: torch.Tensor,
    v: torch.Tensor,
    first: int,
    scheme: AttentionScheme,
    inv_freq: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    c, heads, _ = q.shape
    kv_heads = k.shape[0]
    group = heads // kv_heads
    w = scheme.window
    positions = torch.arange(first, first + c, dtype=torch.float64)
    if (s := logn_scale(scheme, positions)) is not None:
        q = q * s.to(q.device, q.dtype)[:, None, None]
    a, _ = outside_positions(scheme, positions, positions[:1])
    q_far = fold_heads(rotate(q.transpose(0, 1), a, inv_freq), kv_heads)[None]
    # Keys far for every query of the block: j <= first - w. Keys far for some: up to last - w.
    # Keys in the band for some: first - w < j <= last.
    far_all, far_some, end = max(0, first - w + 1), max(0, first + c - w), first + c
    parts = []
    if far_all:
        parts.append(attend(q_far, k_far[None, :, :far_all], v[None, :, :far_all], scale))
    if far_some > far_all:
        keys = torch.arange(far_all, far_some, dtype=torch.float64)
        allowed = (positions[:, None] - keys[None, :]) >= w
        parts.append(
            _masked(q_far, k_far[None, :, far_all:far_some], v[None, :, far_all:far_some], allowed, group, scale)
        )
    keys = torch.arange(far_all, end, dtype=torch.float64)
    distance = positions[:, None] - keys[None, :]
    q_band = fold_heads(rotate(q.transpose(0, 1), positions, inv_freq), kv_heads)[None]
    k_band = rotate(k[:, far_all:end], keys, inv_freq)[None]
    parts.append(_masked(q_band, k_band, v[None, :, far_all:end], (distance >= 0) & (distance < w), group, scale))
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
