"""The windowed position schemes' reference (tests/support/window_reference.py) against what
must hold: the native scheme is transformers' Llama; a window covering the prompt is native
exactly; leaky slope 1 and group size 1 are native; relative positions follow the papers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.support.tiny_models import save_tiny_llama
from tests.support.window_reference import LlamaWeights, Scheme, logits, relative_positions

N = 48


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(
        tmp_path_factory.mktemp("tiny") / "llama",
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16,
        rope_theta=10000.0,
        initializer_range=0.2,
    )


@pytest.fixture(scope="module")
def ids() -> list[int]:
    return torch.randint(0, 96, (N,), generator=torch.Generator().manual_seed(1)).tolist()


def test_the_native_scheme_is_transformers_llama(tiny: Path, ids: list[int]) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0]
    got = logits(LlamaWeights.load(tiny), ids)
    assert torch.allclose(got, expected, atol=2e-5, rtol=0), (got - expected).abs().max()


@pytest.mark.parametrize(
    "scheme",
    [Scheme("rerope", window=N), Scheme("leaky_rerope", window=N, k=4.0), Scheme("self_extend", window=N, group=4)],
    ids=["rerope", "leaky_rerope", "self_extend"],
)
def test_a_window_covering_the_prompt_is_native_exactly(tiny: Path, ids: list[int], scheme: Scheme) -> None:
    weights = LlamaWeights.load(tiny)
    assert torch.equal(logits(weights, ids, scheme), logits(weights, ids))


@pytest.mark.parametrize(
    "scheme", [Scheme("leaky_rerope", window=8, k=1.0), Scheme("self_extend", window=8, group=1)], ids=["k=1", "G=1"]
)
def test_no_compression_is_native(tiny: Path, ids: list[int], scheme: Scheme) -> None:
    weights = LlamaWeights.load(tiny)
    assert torch.allclose(logits(weights, ids, scheme), logits(weights, ids), atol=1e-5, rtol=0)


def test_a_small_window_changes_only_positions_beyond_it(tiny: Path, ids: list[int]) -> None:
    weights = LlamaWeights.load(tiny)
    native, rerope = logits(weights, ids), logits(weights, ids, Scheme("rerope", window=8))
    assert torch.equal(rerope[:8], native[:8])  # every pair of the first 8 positions is inside the window
    assert not torch.allclose(rerope[8:], native[8:], atol=1e-3)


def papers_relative_position(scheme: Scheme, i: int, j: int) -> float:
    """What each paper says a pair (i, j), j <= i, is scored at, pair by pair."""
    d = i - j
    if scheme.kind == "rerope":  # ReRoPE: min(i - j, w)
        return float(min(d, scheme.window))
    if scheme.kind == "leaky_rerope":  # Leaky ReRoPE: w + (i - j - w)/k past the window
        return float(d) if d < scheme.window else scheme.window + (d - scheme.window) / scheme.k
    if scheme.kind == "self_extend":  # Self-Extend: grouped distance shifted by W - W/G past W
        g, big_w = scheme.group, scheme.window
        return float(d) if d < big_w else float(i // g - j // g + big_w - big_w // g)
    if scheme.kind == "string":  # STRING: d - S + W from the shifted offset S on (capped at C)
        if d < scheme.shift:
            return float(d)
        shifted = d - scheme.shift + scheme.local_window
        return float(shifted if scheme.cap is None else min(shifted, scheme.cap))
    # DCA (ChunkLlama, section 3): the true distance within a chunk and from the first w queries of
    # a chunk into the previous one; otherwise S - (j mod c), at most S.
    s = scheme.chunk_size
    c = s - scheme.local_window
    if i // c == j // c or (i // c - j // c == 1 and i % c < scheme.local_window):
        return float(d)
    return float(s - j % c)


@pytest.mark.parametrize(
    "scheme",
    [
        Scheme("rerope", window=4),
        Scheme("leaky_rerope", window=4, k=2.0),
        Scheme("self_extend", window=4, group=2),
        Scheme("self_extend", window=6, group=3),
        Scheme("dca", chunk_size=6, local_window=2),
        Scheme("dca", chunk_size=7, local_window=1),
        Scheme("string", shift=8, local_window=2),
        Scheme("string", shift=8, local_window=2, cap=12),
    ],
    ids=lambda s: f"{s.kind}-cap{s.cap}" if s.kind == "string" else s.kind,
)
def test_relative_positions_follow_each_paper(scheme: Scheme) -> None:
    n = 30
    rel = relative_positions(scheme, n)
    for i in range(n):
        assert [rel[i, j].item() for j in range(i + 1)] == [
            papers_relative_position(scheme, i, j) for j in range(i + 1)
        ]
    assert math.isnan(rel[0, 1].item())  # no key after the query


def test_dual_chunk_distances_stay_within_the_chunk_size_and_the_first_chunk_is_native() -> None:
    scheme = Scheme("dca", chunk_size=6, local_window=2)  # c = 4
    rel = relative_positions(scheme, 40).nan_to_num(0)
    assert rel.max().item() == 6
    native = relative_positions(Scheme(), 4)
    assert torch.equal(relative_positions(scheme, 40)[:4, :4].nan_to_num(-1), native.nan_to_num(-1))


def test_dual_chunk_within_one_chunk_is_native_exactly(tiny: Path, ids: list[int]) -> None:
    weights = LlamaWeights.load(tiny)
    scheme = Scheme("dca", chunk_size=N + 4, local_window=4)  # c = N: one chunk
    assert torch.equal(logits(weights, ids, scheme), logits(weights, ids))
    assert not torch.allclose(
        logits(weights, ids, Scheme("dca", chunk_size=20, local_window=4))[16:], logits(weights, ids)[16:], atol=1e-3
    )


def test_logn_scales_only_past_its_window(tiny: Path, ids: list[int]) -> None:
    weights = LlamaWeights.load(tiny)
    scaled = logits(weights, ids, Scheme(logn_window=16))
    native = logits(weights, ids)
    assert torch.equal(scaled[:16], native[:16])  # ln(i+1)/ln(16) <= 1 for i < 16
    assert not torch.allclose(scaled[16:], native[16:], atol=1e-4)
