"""NBCE and auto without an engine: rows per CONTRACT.md, chunking, parameters, the combination."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from strategies.base import ModelFacts, StrategyError, StrategyRequest
from strategies.nbce import NbceParams, NbceStrategy, split_document
from strategies.nbce_reference import combine
from strategies.registry import default_registry

MODEL_DIR = Path(os.environ.get("ROPESERVE_MODEL_CACHE", "~/.cache/ropeserve/models")).expanduser() / "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def facts() -> ModelFacts:
    from server.engines.vllm_engine import read_model_facts

    return read_model_facts(str(MODEL_DIR))


def essay(paragraphs: int) -> str:
    sentences = ["The river bends twice before the mill.", "Nobody remembers who built the bridge.",
                 "In spring the fields flood and the herons come back.", "The old road is closed to carts."]
    return "\n\n".join(" ".join(sentences[(p + i) % 4] for i in range(6)) for p in range(paragraphs))


def test_list_context_rows_follow_the_contract(tokenizer, facts):
    docs = ("First document about apples.", "Second one, about pears.")
    q = "Which fruit?"
    plan = NbceStrategy(NbceParams()).plan(StrategyRequest(q, docs, 16), facts, tokenizer.encode)
    assert plan.rows[0] == tokenizer.encode(q)
    assert plan.rows[1:] == [tokenizer.encode(d + "\n\n" + q) for d in docs]
    assert plan.combiner == {"name": "nbce", "beta": 0.25, "pooling": "min_entropy", "eta": 0.0,
                             "top_p": None, "uncond_row": 0}
    assert plan.rope.is_native and plan.resolved["rows"] == 3


def test_string_context_is_chunked_on_boundaries(tokenizer, facts):
    text = essay(120)
    q = "What bends twice?"
    plan = NbceStrategy(NbceParams(chunk_tokens=400)).plan(StrategyRequest(q, (text,), 16), facts, tokenizer.encode)
    chunks = split_document(text, 400, tokenizer.encode)
    assert len(plan.rows) == len(chunks) + 1 > 3
    for row, chunk in zip(plan.rows[1:], chunks):
        assert row == tokenizer.encode(chunk + "\n\n" + q)
        assert len(tokenizer.encode(chunk)) <= 400 + 8
        assert chunk.endswith(".")  # sentence (here: paragraph) boundaries, never mid-word
    # Nothing lost: the chunks are the document's paragraphs and sentences in order.
    assert " ".join(c.replace("\n\n", " ") for c in chunks) == text.replace("\n\n", " ")


def test_default_chunk_fills_the_window(tokenizer, facts):
    text = essay(900)  # ~ 3-4 native windows
    plan = NbceStrategy(NbceParams()).plan(StrategyRequest("Q?", (text,), 64), facts, tokenizer.encode)
    assert all(len(r) + 64 <= facts.native_window for r in plan.rows)
    assert max(len(r) for r in plan.rows) > 0.9 * facts.native_window


def test_rope_composes_through_the_registry(tokenizer, facts):
    text = essay(900)
    plan = NbceStrategy(NbceParams(rope={"name": "yarn", "factor": 2})).plan(
        StrategyRequest("Q?", (text,), 32), facts, tokenizer.encode)
    assert plan.rope.as_dict()["rope_type"] == "yarn"
    assert max(len(r) for r in plan.rows) > facts.native_window
    assert plan.resolved["rope"]["name"] == "yarn"


@pytest.mark.parametrize(
    "spec",
    [{"name": "nbce", "pooling": "median"}, {"name": "nbce", "beta": -1}, {"name": "nbce", "chunk_tokens": 4},
     {"name": "nbce", "rope": "nbce"}, {"name": "nbce", "rope": {"name": "nope"}}, {"name": "nbce", "bogus": 1}],
)
def test_bad_parameters_are_strategy_errors(spec, tokenizer, facts):
    with pytest.raises(StrategyError):
        default_registry().resolve(spec, "native").plan(StrategyRequest("Q?", ("doc",), 8), facts, tokenizer.encode)


def test_nbce_needs_context_and_fitting_documents(tokenizer, facts):
    with pytest.raises(StrategyError, match="context"):
        NbceStrategy(NbceParams()).plan(StrategyRequest("Q?", (), 8), facts, tokenizer.encode)
    with pytest.raises(StrategyError, match=r"context\[1\]"):
        NbceStrategy(NbceParams()).plan(StrategyRequest("Q?", ("short", essay(900)), 8), facts, tokenizer.encode)


def test_auto_picks_by_length(tokenizer, facts):
    auto = default_registry().resolve("auto", "native")
    short = auto.plan(StrategyRequest("Q?", ("tiny doc",), 8), facts, tokenizer.encode)
    assert short.resolved["chosen"]["name"] == "native" and "fit" in short.resolved["reason"]
    mid = auto.plan(StrategyRequest("Q?", (essay(200),), 8), facts, tokenizer.encode)
    assert mid.resolved["chosen"]["name"] not in ("native", "nbce") and mid.resolved["chosen"]["factor"] >= 2
    # Measured best: dynamic_ntk, whose base follows the length, up to 3 x the window.
    between = auto.plan(StrategyRequest("Q?", (essay(330),), 8), facts, tokenizer.encode)
    assert 2 * facts.native_window < between.prompt_tokens < 3 * facts.native_window
    assert between.resolved["chosen"]["name"] == mid.resolved["chosen"]["name"] == "dynamic_ntk"
    assert between.rope != mid.rope, "a longer bucket gets a larger base"
    long = auto.plan(StrategyRequest("Q?", (essay(700),), 8), facts, tokenizer.encode)
    assert long.resolved["chosen"]["name"] == "nbce" and long.combiner["name"] == "nbce"
    assert "within max_rope_factor 3" in between.resolved["reason"]
    # All `inputs`, nothing to split: RoPE scaling past max_rope_factor, and the reason says so.
    asked = auto.plan(StrategyRequest(essay(700), (), 8), facts, tokenizer.encode)
    assert asked.resolved["chosen"]["name"] == "dynamic_ntk"
    assert "no context to split" in asked.resolved["reason"], asked.resolved["reason"]


def test_engine_combination_equals_reference():
    pytest.importorskip("vllm")
    from server.engines.nbce_processor import combine_rows

    torch.manual_seed(0)
    logits = torch.randn(5, 1000) * 3
    for pooling in ("min_entropy", "max_prob", "mean"):
        for eta, prev in ((0.0, None), (0.3, 2)):
            for top_p in (None, 0.9):
                a, ka = combine(logits, 0.25, pooling, eta, prev, top_p)
                b, kb = combine_rows(logits, 0.25, pooling, eta, prev, top_p)
                assert ka == kb and torch.equal(a, b)


def test_reference_matches_the_published_formula():
    """bojone/NBCE test.py, core lines, on random logits (row 0 unconditioned)."""
    torch.manual_seed(1)
    logits = torch.randn(4, 500) * 4
    beta = 0.25
    lg = logits - logits.logsumexp(dim=-1, keepdim=True)
    k = (lg.exp() * lg.clip(-100, 0)).sum(dim=-1)[1:].argmax() + 1
    merged = (1 + beta) * lg[k] - beta * lg[0]
    expected = torch.where(lg[0] > -100, merged, lg[k])
    got, kk = combine(logits, beta)
    assert kk == int(k)
    torch.testing.assert_close(got, expected)
