"""A scheme's attention computed as the engine computes it (server/engines/scheme_attention/impl.py),
from unrotated queries and keys, for the tests that hold it against the reference.

The engine's rotary rotates every token at the scheme's `table_positions`; each step hands the
scheme its queries, scaled by `query_scale`, and the row's keys (with its far keys, rotated once).
Rotation here is the reference's own (tests/support/window_reference.py).
"""

from __future__ import annotations

import torch

from server.attention.rotary import inverse_frequencies
from server.plan import AttentionScheme, RowKV
from tests.support import window_reference as ref


def random_qkv(n: int, seed: int, heads: int = 6, kv_heads: int = 2, d: int = 16) -> tuple[torch.Tensor, ...]:
    """Queries [n, heads, d], keys and values [kv_heads, n, d], float64, from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, heads, d, generator=gen, dtype=torch.float64)
    k = torch.randn(kv_heads, n, d, generator=gen, dtype=torch.float64)
    v = torch.randn(kv_heads, n, d, generator=gen, dtype=torch.float64)
    return q, k, v


def served(
    scheme: AttentionScheme,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    steps: list[int],
    theta: float = 10000.0,
    prompt_length: int | None = None,
) -> torch.Tensor:
    """Attention of every query of q [n, heads, d] over k, v [kv_heads, n, d] (unrotated), the
    queries handed over in steps of the given sizes (chunked prefill, then decode). The scheme
    sizes itself by `prompt_length` (default: the whole row, read as one prompt) or the row's
    current length, whichever is larger, as the runner tells it."""
    n, d = q.shape[0], q.shape[-1]
    assert sum(steps) == n
    at = scheme.table_positions(torch.arange(n))
    q_in = ref.rotate(q.transpose(0, 1), at, theta).transpose(0, 1)
    k_in = ref.rotate(k, at, theta)
    inv_freq = inverse_frequencies(theta, d)
    far = scheme.far_keys(k_in, 0, inv_freq)
    prompt = n if prompt_length is None else prompt_length
    outs, first = [], 0
    for size in steps:
        stop = first + size
        queries = q_in[first:stop]
        factor = scheme.query_scale(torch.arange(first, stop), max(prompt, stop))
        if factor is not None:
            queries = queries * factor.to(queries.dtype)[:, None, None]
        row = RowKV(k_in[:, :stop], v[:, :stop], (k_in if far is None else far)[:, :stop])
        outs.append(scheme.attend(queries, row, first, inv_freq, d**-0.5))
        first = stop
    return torch.cat(outs)


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scheme: ref.Scheme, theta: float = 10000.0
) -> torch.Tensor:
    """The reference over all n positions; q [n, heads, d], k/v [kv_heads, n, d] (unrotated) -> [n, heads, d]."""
    group = q.shape[1] // k.shape[0]
    out = ref.attention(q.transpose(0, 1), k.repeat_interleave(group, 0), v.repeat_interleave(group, 0), scheme, theta)
    return out.transpose(0, 1)
