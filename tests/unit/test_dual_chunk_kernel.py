"""The served Dual Chunk Attention (server/attention/dual_chunk.py) against the reference written
from ChunkLlama (tests/support/window_reference.py: three score matrices chosen by chunk distance,
recomputed from scratch). Float64 inputs; the reference's softmax is float32, hence 1e-6.

The scheme takes what the engine hands it: queries rotated at i mod c and keys at j mod c (rotated
here with the reference's own `rotate`); the reference takes them unrotated."""

from __future__ import annotations

import pytest
import torch

from server.attention.dual_chunk import DualChunk
from tests.support import window_reference as ref
from tests.support.served_scheme import random_qkv, reference, served

SCHEMES = [
    DualChunk(chunk_size=12, local_window=4),  # c = 8
    DualChunk(chunk_size=10, local_window=3),  # c = 7, successive clamp at S = 10
    DualChunk(chunk_size=6, local_window=1),  # c = 5
    DualChunk(chunk_size=12, local_window=4, trained_length=16),  # mscale past 16 tokens
]


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.label())
@pytest.mark.parametrize(
    "steps",
    [[40], [13, 13, 14], [5] * 8, [33, 1, 1, 1, 1, 1, 1, 1], [9], [1] * 20],
    ids=["one-call", "13-steps", "5-steps", "prefill+decode", "short", "decode-only"],
)
def test_dual_chunk_equals_the_three_matrix_reference(scheme: DualChunk, steps: list[int]) -> None:
    n = sum(steps)
    q, k, v = random_qkv(n, seed=n * 7 + len(steps))
    expected = reference(q, k, v, ref.Scheme.of(scheme))
    torch.testing.assert_close(served(scheme, q, k, v, steps), expected, rtol=1e-5, atol=1e-6)


def test_a_row_inside_one_chunk_is_plain_rope_attention() -> None:
    scheme = SCHEMES[0]
    q, k, v = random_qkv(scheme.chunk_len, seed=5)
    native = reference(q, k, v, ref.Scheme())
    torch.testing.assert_close(served(scheme, q, k, v, [scheme.chunk_len]), native, rtol=1e-5, atol=1e-6)


def test_past_one_chunk_the_scheme_changes_the_result() -> None:
    """Negative control: past the first chunk DCA is not plain RoPE attention (else the tests
    above would pass without it)."""
    scheme = SCHEMES[0]
    q, k, v = random_qkv(40, seed=6)
    got = served(scheme, q, k, v, [40])
    native = reference(q, k, v, ref.Scheme())
    assert (got[scheme.chunk_len :] - native[scheme.chunk_len :]).abs().max() > 1e-3


def test_mscale_changes_the_result_only_past_the_trained_length() -> None:
    """Negative control for ChunkLlama's mscale: a row no longer than the trained length is
    untouched by it; a longer one is scored differently (else the mscale case above proves nothing)."""
    plain, scaled = (
        DualChunk(chunk_size=12, local_window=4),
        DualChunk(chunk_size=12, local_window=4, trained_length=16),
    )
    q, k, v = random_qkv(40, seed=8)
    torch.testing.assert_close(
        served(scaled, q[:16], k[:, :16], v[:, :16], [16]), served(plain, q[:16], k[:, :16], v[:, :16], [16])
    )
    assert (served(scaled, q, k, v, [40]) - served(plain, q, k, v, [40])).abs().max() > 1e-3
