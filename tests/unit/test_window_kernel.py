"""The served banded schemes (server/attention/: rerope, leaky_rerope, self_extend) against the
reference written from the papers' code (tests/support/window_reference.py): a score matrix per case
and a `where`, recomputed from scratch. Float64 inputs; the reference takes its softmax in float32
(as bojone's code does), hence 1e-6.

The schemes take what the engine hands them: queries and keys rotated at their own positions (rotated
here with the reference's own `rotate`); the reference takes them unrotated."""

from __future__ import annotations

import pytest
import torch

from server.attention import banded
from server.attention.leaky_rerope import LeakyRerope
from server.attention.rerope import Rerope
from server.attention.self_extend import SelfExtend
from server.plan import AttentionScheme
from tests.support import window_reference as ref
from tests.support.served_scheme import random_qkv, reference, served

SCHEMES: list[AttentionScheme] = [
    Rerope(window=8),
    Rerope(window=8, logn_window=16),
    LeakyRerope(window=8, leak=4.0),
    SelfExtend(window=8, group=4),
    SelfExtend(window=12, group=3, logn_window=20),
]


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.label())
@pytest.mark.parametrize(("n", "queries"), [(40, 40), (40, 1), (40, 7), (9, 9), (70, 30)])
def test_banded_equals_the_two_matrix_reference(
    scheme: AttentionScheme, n: int, queries: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(banded, "QUERY_BLOCK", 16)  # several blocks, so block edges are covered
    q, k, v = random_qkv(n, seed=n * 100 + queries)
    steps = [n - queries, queries] if queries < n else [n]
    expected = reference(q, k, v, ref.Scheme.of(scheme))[n - queries :]
    got = served(scheme, q, k, v, steps)[n - queries :]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_a_window_covering_the_row_is_plain_rope_attention() -> None:
    n = 30
    q, k, v = random_qkv(n, seed=3)
    got = served(Rerope(window=n), q, k, v, [n])
    torch.testing.assert_close(got, reference(q, k, v, ref.Scheme()), rtol=1e-5, atol=1e-6)


def test_the_far_part_changes_the_result() -> None:
    """Negative control: the window really rotates far keys differently (else the tests above
    would pass with plain RoPE attention)."""
    n = 40
    q, k, v = random_qkv(n, seed=4)
    got = served(SCHEMES[0], q, k, v, [n])
    assert (got - reference(q, k, v, ref.Scheme())).abs().max() > 1e-3


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.label())
def test_far_positions_give_the_reference_relative_positions(scheme: AttentionScheme) -> None:
    """The scheme's (a(i), b(j)) beyond the window yield the relative positions the reference's
    own cases give (the two are written separately)."""
    assert isinstance(scheme, banded.TwoBandScheme)
    pos = torch.arange(50, dtype=torch.float64)
    a, b = scheme.far_query(pos), scheme.far_key(pos)
    far = (pos[:, None] - pos[None, :]) >= scheme.window
    expected = ref.relative_positions(ref.Scheme.of(scheme), 50)
    assert torch.equal((a[:, None] - b[None, :])[far], expected[far])
    assert scheme.max_distance(50) == expected.nan_to_num(-1).max().item()
