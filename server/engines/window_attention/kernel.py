"""Two-band attention: one row's attention under a window scheme, from its queries and keys as the
engine rotated them (each at its own position, ordinary RoPE).

A query at position i scores key j with ordinary RoPE while i - j < w (the band) and with the
scheme's far rotations beyond it: q at a(i), k at b(j) (positions.py); rotations compose, so the
far query is the query rotated on by a(i) - i and the far key the key rotated on by b(j) - j (once
per key: the engine's row copies keep them, row_cache.py). Rather than two full score
matrices and a `where` (the papers' code; O(C x n) memory, 7 s for 256 x 24k here), the keys of a
block of queries [first, last] (at most w queries) split into sets that fused attention handles
without materialising scores, only two of them a block wide and masked:

| keys                          | rotation        | mask                         |
|-------------------------------|-----------------|------------------------------|
| j <= first - w                | q at a(i), b(j) | none: far for every query    |
| first - w < j <= last - w     | q at a(i), b(j) | far: i - j >= w              |
| the same keys                 | q at i, k at j  | near: i - j < w              |
| last - w < j < first          | q at i, k at j  | none: near for every query   |
| first <= j <= last            | q at i, k at j  | causal (the block itself)    |

The sets merge by their log-sum-exp (fused.py), so the cost is one plain attention over the row
plus 2 x block x block masked scores; no key is rotated per call. GQA is folded into
the query length (each KV head's query heads one after another), so no key is repeated.

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

# Queries per block (and at most the window): bounds the masked parts at QUERY_BLOCK^2 per group.
QUERY_BLOCK = 512


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
    values k, v [kv_heads, n, d] at positions 0..n-1 (n = first_position + C), each rotated at its
    own position; `k_far`: the keys rotated at b(j) (`far_keys`), if the caller keeps them.
    Returns [C, heads, d] in q's dtype."""
    num_queries = q.shape[0]
    n = k.shape[1]
    if n != first_position + num_queries:
        raise ValueError(f"{n} keys for queries at {first_position}..{first_position + num_queries - 1}")
    if k_far is None:
        k_far = far_keys(k, 0, scheme, inv_freq)
    block = max(1, min(QUERY_BLOCK, scheme.window))
    out = torch.empty_like(q)
    for start in range(0, num_queries, block):
        stop = min(start + block, num_queries)
        out[start:stop] = _block(q[start:stop], k, k_far, v, first_position + start, scheme, inv_freq, scale)
    return out


def far_rotation(scheme: AttentionScheme, inv_freq: torch.Tensor) -> FarKeys | None:
    """`far_keys` for this scheme, for the row copies to apply to each appended key; None for DCA,
    whose keys the paged cache already holds rotated where every part reads them."""
    if scheme.kind == "dca":
        return None
    return functools.partial(far_keys, scheme=scheme, inv_freq=inv_freq)


def far_keys(k: torch.Tensor, first_position: int, scheme: AttentionScheme, inv_freq: torch.Tensor) -> torch.Tensor:
    """Keys k [kv_heads, m, d] at positions first_position.., rotated there, rotated on to b(j),
    their far position (rerope's b is 0: the keys unrotated)."""
    positions = torch.arange(first_position, first_position + k.shape[1], dtype=torch.float64)
    _, b = outside_positions(scheme, positions[:1], positions)
    return rotate(k, b - positions, inv_freq)


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
    """Queries first..last (last - first < w) of the row."""
    c, heads, d = q.shape
    kv_heads = k.shape[0]
    group = heads // kv_heads
    w, last = scheme.window, first + c - 1
    positions = torch.arange(first, first + c, dtype=torch.float64)
    if (s := logn_scale(scheme, positions)) is not None:  # rotation is linear: scaling commutes with it
        q = q * s.to(q.device, q.dtype)[:, None, None]
    by_head = q.transpose(0, 1)
    a, _ = outside_positions(scheme, positions, positions[:1])
    q_far = fold_heads(rotate(by_head, a - positions, inv_freq), kv_heads)[None]
    q_near = fold_heads(by_head, kv_heads)[None]
    far_all, edge = max(0, first - w + 1), max(0, last - w + 1)
    parts = []
    if far_all:
        parts.append(attend(q_far, k_far[None, :, :far_all], v[None, :, :far_all], scale))
    if edge > far_all:
        distance = positions[:, None] - torch.arange(far_all, edge, dtype=torch.float64)[None, :]
        edge_v = v[None, :, far_all:edge]
        parts.append(_masked(q_far, k_far[None, :, far_all:edge], edge_v, distance >= w, group, scale))
        parts.append(_masked(q_near, k[None, :, far_all:edge], edge_v, distance < w, group, scale))
    if first > edge:
        parts.append(attend(q_near, k[None, :, edge:first], v[None, :, edge:first], scale))
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
