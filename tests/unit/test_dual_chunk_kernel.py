"""The served Dual Chunk Attention kernel (server/engines/window_attention/dual_chunk.py) against the
reference written from ChunkLlama (tests/support/window_reference.py: three score matrices chosen by
chunk distance, recomputed from scratch). Float64 inputs; the reference's softmax is float32, hence 1e-6.

The kernel takes what the engine hands it: queries rotated at i mod c and keys at j mod c (rotated
here with the reference's own `rotate`); the reference takes them unrotated."""

from __future__ import annotations

import pytest
import torch

from server.engines.base import AttentionScheme
from server.engines.window_attention.dual_chunk import dual_chunk_attention
from server.engines.window_attention.positions import inverse_frequencies
from tests.support import window_reference as ref

THETA = 10000.0
HEADS, KV_HEADS, D = 6, 2, 16
SCHEMES = [
    AttentionScheme("dca", chunk_size=12, local_window=4),  # c = 8
    AttentionScheme("dca", chunk_size=10, local_window=3),  # c = 7, successive clamp at S = 10
    AttentionScheme("dca", chunk_size=6, local_window=1),  # c = 5
]


def tensors(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, HEADS, D, generator=gen, dtype=torch.float64)
    k = torch.randn(KV_HEADS, n, D, generator=gen, dtype=torch.float64)
    v = torch.randn(KV_HEADS, n, D, generator=gen, dtype=torch.float64)
    return q, k, v


def reference_output(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scheme: ref.Scheme) -> torch.Tensor:
    """The reference over all n positions; q [n, heads, d], k/v [kv_heads, n, d] (unrotated)."""
    group = HEADS // KV_HEADS
    out = ref.attention(q.transpose(0, 1), k.repeat_interleave(group, 0), v.repeat_interleave(group, 0), scheme, THETA)
    return out.transpose(0, 1)


def served(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scheme: AttentionScheme, steps: list[int]
) -> torch.Tensor:
    """The kernel as the engine runs it: q and k rotated at their position mod c, queries handed
    over in steps of the given sizes (chunked prefill, then decode)."""
    n, c = q.shape[0], scheme.chunk_len
    local = torch.arange(n) % c
    q_in = ref.rotate(q.transpose(0, 1), local, THETA).transpose(0, 1)
    k_in = ref.rotate(k, local, THETA)
    inv_freq = inverse_frequencies(THETA, D)
    outs, first = [], 0
    for size in steps:
        stop = first + size
        outs.append(
            dual_chunk_attention(q_in[first:stop], k_in[:, :stop], v[:, :stop], first, scheme, inv_freq, D**-0.5)
        )
        first = stop
    assert first == n
    return torch.cat(outs)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.label())
@pytest.mark.parametrize(
    "steps",
    [[40], [13, 13, 14], [5] * 8, [33, 1, 1, 1, 1, 1, 1, 1], [9], [1] * 20],
    ids=["one-call", "13-steps", "5-steps", "prefill+decode", "short", "decode-only"],
)
def test_dual_chunk_equals_the_three_matrix_reference(scheme: AttentionScheme, steps: list[int]) -> None:
    n = sum(steps)
    q, k, v = tensors(n, seed=n * 7 + len(steps))
    expected = reference_output(q, k, v, ref.Scheme.of(scheme))
    torch.testing.assert_close(served(q, k, v, scheme, steps), expected, rtol=1e-5, atol=1e-6)


def test_a_row_inside_one_chunk_is_plain_rope_attention() -> None:
    scheme = SCHEMES[0]
    q, k, v = tensors(scheme.chunk_len, seed=5)
    native = reference_output(q, k, v, ref.Scheme())
    torch.testing.assert_close(served(q, k, v, scheme, [scheme.chunk_len]), native, rtol=1e-5, atol=1e-6)


def test_past_one_chunk_the_scheme_changes_the_result() -> None:
    """Negative control: past the first chunk DCA is not plain RoPE attention (else the tests
    above would pass without it)."""
    scheme = SCHEMES[0]
    q, k, v = tensors(40, seed=6)
    got = served(q, k, v, scheme, [40])
    native = reference_output(q, k, v, ref.Scheme())
    assert (got[scheme.chunk_len :] - native[scheme.chunk_len :]).abs().max() > 1e-3
