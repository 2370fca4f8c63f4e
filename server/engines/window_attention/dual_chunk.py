"""Dual Chunk Attention (An et al. 2024, HKUNLP/ChunkLlama): one row's attention from its paged keys.

The row is cut into chunks of c = S - w tokens from position 0 (S the chunk size, w the local
window). Every key is rotated at j mod c, which is how the engine writes it to the paged cache (the
runner hands the model's rotary the position i mod c), so no key is ever rotated again. Queries
arrive rotated at i mod c too, and each query block inside one chunk makes up to four fused calls:

| part                          | keys                        | query rotated at        | mask   |
|-------------------------------|-----------------------------|-------------------------|--------|
| intra, before the block       | chunk start .. block start  | i mod c (as it arrives) | none   |
| intra, the block itself       | the block                   | i mod c                 | causal |
| successive (previous chunk)   | the c keys before the chunk | min(i mod c + c, S)     | none   |
| inter (every earlier chunk)   | 0 .. chunk start - c        | min(2c - 1, S)          | none   |

merged by their log-sum-exp (fused.py): the cost of one causal attention over the row, plus the
two re-rotations of the block's queries. The largest relative position a score sees is S.

    >>> from server.engines.base import AttentionScheme
    >>> from server.engines.window_attention.positions import inverse_frequencies
    >>> q, k, v = torch.randn(4, 2, 8), torch.randn(1, 10, 8), torch.randn(1, 10, 8)
    >>> scheme = AttentionScheme("dca", chunk_size=4, local_window=1)
    >>> dual_chunk_attention(q, k, v, 6, scheme, inverse_frequencies(1e4, 8), 8**-0.5).shape
    torch.Size([4, 2, 8])
"""

from __future__ import annotations

import torch

from server.engines.base import AttentionScheme
from server.engines.window_attention.fused import attend, fold_heads, merge, unfold_heads
from server.engines.window_attention.positions import rotate


def dual_chunk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    first_position: int,
    scheme: AttentionScheme,
    inv_freq: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of queries q [C, heads, d] at positions first_position.. (rotated at i mod c) over
    the row's keys and values k, v [kv_heads, n, d] (keys rotated at j mod c), n = first_position + C.
    Returns [C, heads, d] in q's dtype."""
    num_queries = q.shape[0]
    if k.shape[1] != first_position + num_queries:
        raise ValueError(f"{k.shape[1]} keys for queries at {first_position}..{first_position + num_queries - 1}")
    c = scheme.chunk_len
    out = torch.empty_like(q)
    start, end = first_position, first_position + num_queries
    while start < end:
        chunk_start = start - start % c
        stop = min(end, chunk_start + c)
        rows = slice(start - first_position, stop - first_position)
        out[rows] = _chunk_block(q[rows], k, v, start, chunk_start, scheme, inv_freq, scale)
        start = stop
    return out


def _chunk_block(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    first: int,
    chunk_start: int,
    scheme: AttentionScheme,
    inv_freq: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Queries first.. that all lie in the chunk starting at `chunk_start`."""
    c, s = scheme.chunk_len, scheme.chunk_size
    num, heads, d = q.shape
    kv_heads = k.shape[0]
    group = heads // kv_heads
    last = first + num
    by_head = q.transpose(0, 1)  # [heads, num, d]
    folded = fold_heads(by_head, kv_heads)[None]
    parts = []
    if first > chunk_start:
        parts.append(attend(folded, k[None, :, chunk_start:first], v[None, :, chunk_start:first], scale))
    # The block against itself, causal: per query head, so that the mask lines up with the keys.
    block_k = k[:, first:last].repeat_interleave(group, 0)[None]
    block_v = v[:, first:last].repeat_interleave(group, 0)[None]
    out, lse = attend(by_head[None], block_k, block_v, scale, causal=num > 1)
    parts.append((out.reshape(1, kv_heads, group * num, d), lse.reshape(1, kv_heads, group * num)))
    local = torch.arange(first - chunk_start, last - chunk_start, dtype=torch.float64)
    if chunk_start >= c:
        successive = (local + c).clamp(max=s) - local  # from i mod c to min(i mod c + c, S)
        q_succ = fold_heads(rotate(by_head, successive, inv_freq), kv_heads)[None]
        previous = slice(chunk_start - c, chunk_start)
        parts.append(attend(q_succ, k[None, :, previous], v[None, :, previous], scale))
    if chunk_start >= 2 * c:
        inter = min(2 * c - 1, s) - local  # from i mod c to min(2c - 1, S)
        q_inter = fold_heads(rotate(by_head, inter, inv_freq), kv_heads)[None]
        earlier = slice(0, chunk_start - c)
        parts.append(attend(q_inter, k[None, :, earlier], v[None, :, earlier], scale))
    return unfold_heads(merge(parts)[0].to(q.dtype), num)
