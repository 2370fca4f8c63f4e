"""The served window-attention kernel (server/engines/window_attention/) against the reference
written from the papers' code (tests/support/window_reference.py): a score matrix per case and a
`where`, recomputed from scratch. Float64 inputs; the reference takes its softmax in float32 (as
bojone's code does), hence 1e-6.

The kernel takes what the engine hands it: queries and keys rotated at their own positions
(rotated here with the reference's own `rotate`); the reference takes them unrotated."""

from __future__ import annotations

import pytest
import torch

from server.engines.base import AttentionScheme
from server.engines.window_attention import kernel
from server.engines.window_attention.positions import inverse_frequencies, outside_positions
from tests.support import window_reference as ref

THETA = 10000.0
HEADS, KV_HEADS, D = 6, 2, 16

SCHEMES = [
    AttentionScheme("rerope", window=8),
    AttentionScheme("rerope", window=8, logn_window=16),
    AttentionScheme("leaky_rerope", window=8, leak=4.0),
    AttentionScheme("self_extend", window=8, group=4),
    AttentionScheme("self_extend", window=12, group=3, logn_window=20),
]


def served(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first: int, scheme: AttentionScheme) -> torch.Tensor:
    """The kernel on the last queries from `first`, q and k rotated at their positions as the engine's are."""
    n = k.shape[1]
    positions = torch.arange(n)
    q_in = ref.rotate(q.transpose(0, 1), positions, THETA).transpose(0, 1)[first:]
    k_in = ref.rotate(k, positions, THETA)
    return kernel.two_band_attention(q_in, k_in, v, first, scheme, inverse_frequencies(THETA, D), D**-0.5)


def reference_output(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scheme: AttentionScheme) -> torch.Tensor:
    """The reference over all n positions; q [n, heads, d], k/v [kv_heads, n, d] -> [n, heads, d]."""
    group = HEADS // KV_HEADS
    out = ref.attention(
        q.transpose(0, 1), k.repeat_interleave(group, 0), v.repeat_interleave(group, 0), ref.Scheme.of(scheme), THETA
    )
    return out.transpose(0, 1)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.label())
@pytest.mark.parametrize(("n", "queries"), [(40, 40), (40, 1), (40, 7), (9, 9), (70, 30)])
def test_two_band_equals_the_two_matrix_reference(
    scheme: AttentionScheme, n: int, queries: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kernel, "QUERY_BLOCK", 16)  # several blocks, so block edges are covered
    gen = torch.Generator().manual_seed(n * 100 + queries)
    q = torch.randn(n, HEADS, D, generator=gen, dtype=torch.float64)
    k = torch.randn(KV_HEADS, n, D, generator=gen, dtype=torch.float64)
    v = torch.randn(KV_HEADS, n, D, generator=gen, dtype=torch.float64)
    expected = reference_output(q, k, v, scheme)[n - queries :]
    got = served(q, k, v, n - queries, scheme)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_a_window_covering_the_row_is_plain_rope_attention() -> None:
    n = 30
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(n, HEADS, D, generator=gen, dtype=torch.float64)
    k, v = torch.randn(2, KV_HEADS, n, D, generator=gen, dtype=torch.float64)
    got = served(q, k, v, 0, AttentionScheme("rerope", window=n))
    native = reference_output(q, k, v, AttentionScheme("rerope", window=10**6))
    torch.testing.assert_close(got, native, rtol=1e-5, atol=1e-6)


def test_the_far_part_changes_the_result() -> None:
    """Negative control: the window really rotates far keys differently (else the tests above
    would pass with plain RoPE attention)."""
    n = 40
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(n, HEADS, D, generator=gen, dtype=torch.float64)
    k, v = torch.randn(2, KV_HEADS, n, D, generator=gen, dtype=torch.float64)
    got = served(q, k, v, 0, SCHEMES[0])
    native = reference_output(q, k, v, AttentionScheme("rerope", window=10**6))
    assert (got - native).abs().max() > 1e-3


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.label())
def test_far_positions_give_the_reference_relative_positions(scheme: AttentionScheme) -> None:
    """The kernel's (a(i), b(j)) beyond the window yield the relative positions the reference's
    own cases give (the two are written separately)."""
    pos = torch.arange(50, dtype=torch.float64)
    a, b = outside_positions(scheme, pos, pos)
    far = (pos[:, None] - pos[None, :]) >= scheme.window
    expected = ref.relative_positions(ref.Scheme.of(scheme), 50)
    assert torch.equal((a[:, None] - b[None, :])[far], expected[far])
