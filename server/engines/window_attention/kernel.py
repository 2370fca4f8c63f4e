"""Two-band attention: one row's attention under a window scheme, from unrotated queries and keys.

A query at position i scores key j with ordinary RoPE while i - j < w (the band) and with the
scheme's far rotations beyond it: q at a(i), k at b(j) (positions.py). Rather than two full score
matrices and a `where` (the papers' code; O(C x n) memory, 7 s for 256 x 24k here), the keys split
into two parts that fused attention handles without materialising scores:

- keys that are far for every query of the block (j <= i_first - w): one unmasked fused attention
  with q at a(i), k at b(j);
- the rest (at most w + block keys): one fused attention over the keys twice, once rotated at j,
  once at b(j), against the query concatenated [q at i, q at a(i)] with the keys padded
  [k at j, 0] / [0, k at b(j)], so each copy scores with its own rotation; a mask keeps the band
  copy for i - j < w and the far copy beyond (values are zero-padded to the same width).

The two parts merge by their log-sum-exp. GQA is folded into the query length (each KV head's
query heads one after another), so no key is repeated.

    >>> from server.engines.base import AttentionScheme
    >>> from server.engines.window_attention.positions import inverse_frequencies
    >>> q, k, v = torch.randn(4, 2, 8), torch.randn(1, 10, 8), torch.randn(1, 10, 8)
    >>> scheme = AttentionScheme("rerope", window=3)
    >>> two_band_attention(q, k, v, 6, scheme, inverse_frequencies(1e4, 8), 8**-0.5).shape
    torch.Size([4, 2, 8])
"""

from __future__ import annotations

import torch

from server.engines.base import AttentionScheme
from server.engines.window_attention.positions import logn_scale, outside_positions, rotate

# Queries per fused call: bounds the band part's mask at QUERY_BLOCK x (w + QUERY_BLOCK) per group.
QUERY_BLOCK = 256

_fused = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def two_band_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    first_position: int,
    scheme: AttentionScheme,
    inv_freq: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of queries q [C, heads, d] at positions first_position.. over the row's keys and
    values k, v [kv_heads, n, d] at positions 0..n-1 (n = first_position + C), all unrotated.
    Returns [C, heads, d] in q's dtype."""
    num_queries = q.shape[0]
    n = k.shape[1]
    if n != first_position + num_queries:
        raise ValueError(f"{n} keys for queries at {first_position}..{first_position + num_queries - 1}")
    key_positions = torch.arange(n, dtype=torch.float64)
    _, b = outside_positions(scheme, key_positions[:1], key_positions)
    k_far = k if scheme.kind == "rerope" else rotate(k, b, inv_freq)  # rerope: b = 0, no rotation
    out = torch.empty_like(q)
    for start in range(0, num_queries, QUERY_BLOCK):
        stop = min(start + QUERY_BLOCK, num_queries)
        out[start:stop] = _block(q[start:stop], k, k_far, v, first_position + start, scheme, inv_freq, scale)
    return out


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
        q = q * s.to(q.dtype)[:, None, None]
    a, _ = outside_positions(scheme, positions, positions[:1])
    q_band = _fold(rotate(q.transpose(0, 1), positions, inv_freq), kv_heads)
    q_far = _fold(rotate(q.transpose(0, 1), a, inv_freq), kv_heads)

    # Keys that may be in the band for some query of the block: j > first - w, up to the last query.
    band_start, end = max(0, first - w + 1), first + c
    k_band = rotate(k[:, band_start:end], torch.arange(band_start, end, dtype=torch.float64), inv_freq)
    zeros = torch.zeros_like(k_band)
    keys = torch.cat([torch.cat([k_band, zeros], -1), torch.cat([zeros, k_far[:, band_start:end]], -1)], dim=1)
    # Fused attention wants values as wide as the keys: zero-pad them and keep the first half out.
    v_near = torch.cat([v[:, band_start:end], torch.zeros_like(v[:, band_start:end])], -1)
    values = torch.cat([v_near, v_near], dim=1)
    distance = positions[:, None] - torch.arange(band_start, end, dtype=torch.float64)[None, :]
    allowed = torch.cat([(distance >= 0) & (distance < w), distance >= w], dim=1).repeat(group, 1)
    mask = torch.zeros(allowed.shape, dtype=q.dtype).masked_fill_(~allowed, float("-inf"))
    near_out, near_lse = _fused(
        torch.cat([q_band, q_far], -1)[None], keys[None], values[None], attn_mask=mask[None, None], scale=scale
    )
    near_out = near_out[..., : q.shape[-1]]
    if band_start == 0:
        return _unfold(near_out[0], c)
    far_out, far_lse = _fused(q_far[None], k_far[None, :, :band_start], v[None, :, :band_start], scale=scale)
    top = torch.maximum(near_lse, far_lse)
    near_weight, far_weight = (near_lse - top).exp(), (far_lse - top).exp()
    merged = (near_out * near_weight[..., None] + far_out * far_weight[..., None]) / (near_weight + far_weight)[
        ..., None
    ]
    return _unfold(merged[0].to(q.dtype), c)


def _fold(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[heads, c, d] -> [kv_heads, group * c, d]: each KV head's query heads one after another."""
    heads, c, d = x.shape
    return x.reshape(kv_heads, (heads // kv_heads) * c, d)


def _unfold(x: torch.Tensor, c: int) -> torch.Tensor:
    """[kv_heads, group * c, d] -> [c, heads, d]."""
    kv_heads, gc, d = x.shape
    return x.reshape(kv_heads * (gc // c), c, d).transpose(0, 1)
