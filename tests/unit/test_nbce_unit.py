"""NBCE and auto without an engine: rows per CONTRACT.md, chunking, parameters, the row tag, and
the combination against the published formulas written out here."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from server.ops.model_store import default_checkpoint_dir
from server.plan import ModelFacts
from strategies.base import PlanContext, PromptTokens, StrategyError, StrategyRequest, TokenizedText
from strategies.nbce import NbceParams, NbceStrategy
from strategies.nbce.chunking import chunk_spans
from strategies.nbce.combine import choose_token, combine, top_p_filter
from strategies.nbce.protocol import Combination, Draw, NbceCombiner, RowTag
from strategies.registry import default_registry
from strategies.rope import RopeParams, RopeStrategy
from tests.support.planning import plan_context, plan_with, prompt_tokenizer, tokenized


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_checkpoint_dir())


@pytest.fixture(scope="module")
def facts() -> ModelFacts:
    from server.engines.vllm_engine import read_model_facts

    return read_model_facts(str(default_checkpoint_dir()))


@pytest.fixture(scope="module")
def context(facts) -> PlanContext:
    return plan_context(facts)


def nbce_plan(tokenizer, context: PlanContext, request: StrategyRequest, **params: Any):
    """NBCE's plan of `request`, tokenized as the service tokenizes it."""
    strategy = NbceStrategy(NbceParams(**params))
    return strategy.plan(tokenized(strategy, request, context, tokenizer), context)


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def essay(paragraphs: int) -> str:
    sentences = [
        "The river bends twice before the mill.",
        "Nobody remembers who built the bridge.",
        "In spring the fields flood and the herons come back.",
        "The old road is closed to carts.",
    ]
    return "\n\n".join(" ".join(sentences[(p + i) % 4] for i in range(6)) for p in range(paragraphs))


def test_list_context_rows_follow_the_contract(tokenizer, context):
    """docs/CONTRACT.md, "NBCE rows": row k reads `d_k + "\n\n" + inputs` tokenized as one string;
    a document that ends in blank space makes other tokens with the separator than apart."""
    docs = ("First document about apples.", "Second one, about pears.\n", "Third, plums. \n\n")
    q = "Which fruit?"
    plan = nbce_plan(tokenizer, context, StrategyRequest(q, docs, 16))
    assert plan.rows[0] == tokenizer.encode(q)
    assert plan.rows[1:] == [tokenizer.encode(d + "\n\n" + q) for d in docs]
    assert plan.rows[2] != ids(tokenizer, docs[1]) + ids(tokenizer, "\n\n" + q)  # why: one string
    assert plan.combiner == NbceCombiner(Combination(beta=0.25, pooling="min_entropy", eta=0.0, top_p=None))
    assert plan.rope.is_native and plan.resolved["rows"] == 4


def gaps_between(document: list[int], chunks: list[list[int]]) -> list[list[int]]:
    """The ids of `document` before, between and after `chunks`, found in it in order (AssertionError
    where a chunk is not the document's next ids)."""
    at, gaps = 0, []
    for chunk in chunks:
        start = next(i for i in range(at, len(document) - len(chunk) + 1) if document[i : i + len(chunk)] == chunk)
        gaps.append(document[at:start])
        at = start + len(chunk)
    return [*gaps, document[at:]]


def test_string_context_is_chunked_on_boundaries(tokenizer, context):
    text = essay(120)
    q = "What bends twice?"
    plan = nbce_plan(tokenizer, context, StrategyRequest(q, (text,), 16), chunk_tokens=400)
    question = ids(tokenizer, "\n\n" + q)
    assert len(plan.rows) > 4 and all(row[-len(question) :] == question for row in plan.rows[1:])
    chunks = [row[: -len(question)] for row in plan.rows[1:]]
    for chunk in chunks:
        assert len(chunk) <= 400
        assert tokenizer.decode(chunk).endswith(".")  # sentence (here: paragraph) ends, never mid-word
    # Nothing lost: the chunks are the document's own ids in order, less blank lines at the cuts.
    gaps = gaps_between(ids(tokenizer, text), chunks)
    assert all(tokenizer.decode(gap).isspace() for gap in gaps[1:-1]) and gaps[0] == gaps[-1] == []


@pytest.mark.parametrize(
    ("document", "budget"),
    [
        (essay(120), 400),
        (essay(40), 50),
        (essay(10) + "\n\n" + "lantern meadow " * 300 + "x" * 2000 + " The end.\n\n\nAfter.", 64),
        ("Ünïcödé wörds, 中文文本。 " * 200, 33),
    ],
)
def test_string_context_rows_are_the_references(tokenizer, context, document, budget):
    """The rows of a string context agree token for token with tests/support/nbce_reference.py's,
    which writes the chunking rule out apart from the server's."""
    from tests.support.nbce_reference import reference_rows

    q = "What bends twice?"
    plan = nbce_plan(tokenizer, context, StrategyRequest(q, (document,), 16), chunk_tokens=budget)
    assert plan.rows == reference_rows(tokenizer, document, q, budget)


@pytest.mark.parametrize(("document", "budget"), [(essay(120), 400), (essay(40), 50)])
def test_a_chunks_row_is_its_text_and_the_question_tokenized_as_one_string(tokenizer, context, document, budget):
    """The contract's row for a chunk of a string context: its text, the separator and the inputs
    tokenized as one string, as the chunk's ids and the question's ids are for this tokenizer."""
    q = "What bends twice?"
    plan = nbce_plan(tokenizer, context, StrategyRequest(q, (document,), 16), chunk_tokens=budget)
    doc = prompt_tokenizer(tokenizer).document(document)
    texts = [doc.span_text(span) for span in chunk_spans(doc, budget)]
    assert plan.rows[1:] == [tokenizer.encode(text + "\n\n" + q) for text in texts]


def chunked(tokenizer, text: str, budget: int) -> tuple[TokenizedText, list[range]]:
    doc = prompt_tokenizer(tokenizer).document(text)
    return doc, chunk_spans(doc, budget)


@pytest.mark.parametrize("budget", [16, 50, 120, 400])
def test_chunks_are_the_documents_ids_cut_within_the_budget(tokenizer, budget):
    """Every chunk holds at most `budget` tokens; together, in order, they are the document's ids
    but for whitespace-only tokens at the cuts."""
    text = essay(40) + "\n\n" + "word " * 300 + "x" * 3000 + " the end."
    doc, spans = chunked(tokenizer, text, budget)
    assert all(0 < len(span) <= budget for span in spans)
    assert all(a.stop <= b.start for a, b in zip(spans, spans[1:], strict=False))
    gaps = [
        range(a.stop, b.start) for a, b in zip([range(0, 0), *spans], [*spans, range(len(doc), len(doc))], strict=True)
    ]
    assert all(doc.span_text(range(i, i + 1)).isspace() for gap in gaps for i in gap)
    assert [doc.ids[i] for span in spans for i in span] == [
        t for t, i in zip(doc.ids, range(len(doc)), strict=True) if not any(i in gap for gap in gaps)
    ]


def test_chunks_end_at_paragraphs_then_sentences_then_words(tokenizer):
    # Paragraphs of ~60 tokens: a budget of 400 finds one in its last fifth, every time.
    doc, spans = chunked(tokenizer, essay(60), 400)
    assert len(spans) > 3
    for span in spans[:-1]:
        assert doc.text[doc.boundary(span.stop) :].startswith("\n\n"), doc.span_text(span)[-40:]
    # Inside a paragraph (budget 50 < a paragraph), sentence ends: every sentence ends with ".".
    doc, spans = chunked(tokenizer, essay(20), 50)
    assert all(doc.span_text(span).endswith(".") for span in spans)
    assert any(not doc.text[doc.boundary(span.stop) :].startswith("\n\n") for span in spans[:-1])
    # No sentence end: word boundaries; one enormous word: token boundaries, the budget filled.
    doc, spans = chunked(tokenizer, "lantern meadow " * 200, 50)
    assert all(doc.text[doc.boundary(span.stop)].isspace() for span in spans[:-1])
    doc, spans = chunked(tokenizer, "x" * 5000, 50)
    assert [len(span) for span in spans[:-1]] == [50] * (len(spans) - 1)
    assert [t for span in spans for t in doc.ids[span.start : span.stop]] == list(doc.ids)


def test_planning_needs_no_tokenizer(facts):
    """Planning reads values: nothing in the context can be called, and a strategy plans from ids
    made by hand, with no tokenizer anywhere."""
    context = plan_context(facts)
    assert [f.name for f in dataclasses.fields(context) if callable(getattr(context, f.name))] == []
    first = TokenizedText("Apples are red.", ids=(11, 12, 13, 14), ends=(6, 10, 14, 15))
    second = TokenizedText("Pears are green.", ids=(21, 12, 23, 14), ends=(5, 9, 15, 16))
    own_prompts = ((11, 12, 13, 14, 5, 7, 8), (21, 12, 23, 14, 5, 7, 8))
    tokens = PromptTokens(
        prompt=(1, 2, 3), inputs=(7, 8), question=(5, 7, 8), documents=(first, second), document_prompts=own_prompts
    )
    request = StrategyRequest("Which?", (first.text, second.text), 4, tokens=tokens)
    plan = NbceStrategy(NbceParams()).plan(request, context)
    assert plan.rows == [[7, 8], *map(list, own_prompts)]
    one = StrategyRequest("Which?", (first.text,), 4, tokens=dataclasses.replace(tokens, documents=(first,)))
    assert NbceStrategy(NbceParams()).plan(one, context).rows == [[7, 8], [11, 12, 13, 14, 5, 7, 8]]
    assert context.resolve("native").plan(request, context).rows == [[1, 2, 3]]


@pytest.mark.parametrize(("split", "prompt"), [("last_paragraph", "A doc.\n\nQ?"), ("last_line", "A doc.\nQ?")])
def test_a_split_prompt_reads_like_a_context(tokenizer, context, split, prompt):
    """`split` cuts the prompt before it is tokenized: the rows are those of the same document and
    question sent as `context` and `inputs`, whatever separator the prompt had."""
    plan = nbce_plan(tokenizer, context, StrategyRequest(prompt, (), 8), split=split)
    assert plan.rows == nbce_plan(tokenizer, context, StrategyRequest("Q?", ("A doc.",), 8)).rows
    assert plan.rows == [tokenizer.encode("Q?"), ids(tokenizer, "A doc.") + ids(tokenizer, "\n\nQ?")]


def test_default_chunk_fills_the_window(tokenizer, context, facts):
    text = essay(900)  # ~ 3-4 native windows
    plan = nbce_plan(tokenizer, context, StrategyRequest("Q?", (text,), 64))
    assert all(len(r) + 64 <= facts.native_window for r in plan.rows)
    assert max(len(r) for r in plan.rows) > 0.9 * facts.native_window


def test_questions_up_to_the_reserve_get_the_same_chunks(tokenizer, context):
    """A second question on the same document plans the same chunks, so its rows' documents are a
    prefix the first question left in the cache; a question past the reserve moves the cuts."""
    text = essay(900)
    short = nbce_plan(tokenizer, context, StrategyRequest("Q?", (text,), 64))
    longer = nbce_plan(tokenizer, context, StrategyRequest("Which road is closed, and to what? " * 8, (text,), 64))
    chunks = [row[: -len(ids(tokenizer, "\n\nQ?"))] for row in short.rows[1:]]
    assert short.resolved["chunk_tokens"] == longer.resolved["chunk_tokens"]
    for chunk, row in zip(chunks, longer.rows[1:], strict=True):
        assert row[: len(chunk)] == chunk
    huge = nbce_plan(tokenizer, context, StrategyRequest("Which road is closed? " * 80, (text,), 64))
    assert huge.resolved["chunk_tokens"] < short.resolved["chunk_tokens"]


def test_rope_composes_through_the_registry(tokenizer, context, facts):
    text = essay(900)
    plan = nbce_plan(tokenizer, context, StrategyRequest("Q?", (text,), 32), rope={"name": "yarn", "factor": 2})
    assert plan.rope.as_dict()["rope_type"] == "yarn"
    assert max(len(r) for r in plan.rows) > facts.native_window
    assert plan.resolved["rope"]["name"] == "yarn"


@pytest.mark.parametrize(
    "spec",
    [
        {"name": "nbce", "pooling": "median"},
        {"name": "nbce", "beta": -1},
        {"name": "nbce", "chunk_tokens": 4},
        {"name": "nbce", "rope": "nbce"},
        {"name": "nbce", "rope": {"name": "nope"}},
        {"name": "nbce", "bogus": 1},
    ],
)
def test_bad_parameters_are_strategy_errors(spec, tokenizer, context):
    with pytest.raises(StrategyError):
        plan_with(context, spec, StrategyRequest("Q?", ("doc",), 8), tokenizer)


def test_nbce_needs_context_and_fitting_documents(tokenizer, context):
    with pytest.raises(StrategyError, match="context"):
        nbce_plan(tokenizer, context, StrategyRequest("Q?", (), 8))
    with pytest.raises(StrategyError, match=r"context\[1\]"):
        nbce_plan(tokenizer, context, StrategyRequest("Q?", ("short", essay(900)), 8))


def test_auto_picks_by_length(tokenizer, context, facts):
    def plan(request: StrategyRequest):
        return plan_with(context, "auto", request, tokenizer)

    short = plan(StrategyRequest("Q?", ("tiny doc",), 8))
    assert short.resolved["chosen"]["name"] == "native" and "fit" in short.resolved["reason"]
    mid = plan(StrategyRequest("Q?", (essay(200),), 8))
    assert mid.resolved["chosen"]["name"] not in ("native", "nbce") and mid.resolved["chosen"]["factor"] >= 2
    # Measured best: dynamic_ntk, whose base follows the length, up to 3 x the window.
    between = plan(StrategyRequest("Q?", (essay(330),), 8))
    assert 2 * facts.native_window < between.prompt_tokens < 3 * facts.native_window
    assert between.resolved["chosen"]["name"] == mid.resolved["chosen"]["name"] == "dynamic_ntk"
    assert between.rope != mid.rope, "a longer bucket gets a larger base"
    long = plan(StrategyRequest("Q?", (essay(700),), 8))
    assert long.resolved["chosen"]["name"] == "nbce" and isinstance(long.combiner, NbceCombiner)
    assert "within max_rope_factor 3" in between.resolved["reason"]
    # All `inputs`, nothing to split: RoPE scaling past max_rope_factor, and the reason says so.
    asked = plan(StrategyRequest(essay(700), (), 8))
    assert asked.resolved["chosen"]["name"] == "dynamic_ntk"
    assert "no context to split" in asked.resolved["reason"], asked.resolved["reason"]


class HalfThetaStrategy(RopeStrategy[RopeParams]):
    """Registered at run time only (no entry point): NBCE and auto must still find it."""

    name = "half_theta"
    description = "test: RoPE base halved"
    Params = RopeParams

    def rope_parameters(self, model: ModelFacts) -> dict[str, Any]:
        return {**self.base_parameters(model), "rope_type": "default", "rope_theta": model.rope_theta / 2}


def test_strategies_registered_at_run_time_are_resolved_by_nbce_and_auto(tokenizer, facts):
    registry = default_registry()
    registry.register(HalfThetaStrategy)
    context = plan_context(facts, registry)
    request = StrategyRequest("Q?", (essay(60),), 8)
    plan = nbce_plan(tokenizer, context, request, rope={"name": "half_theta", "factor": 2})
    assert plan.rope.as_dict()["rope_theta"] == facts.rope_theta / 2
    chosen = plan_with(
        context, {"name": "auto", "rope": "half_theta"}, StrategyRequest("Q?", (essay(200),), 8), tokenizer
    )
    assert chosen.resolved["chosen"]["name"] == "half_theta"
    assert chosen.rope.as_dict()["rope_theta"] == facts.rope_theta / 2
    # The process-wide default registry does not know it: nothing leaks between registries.
    with pytest.raises(StrategyError, match="half_theta"):
        nbce_plan(tokenizer, plan_context(facts), StrategyRequest("Q?", ("doc",), 8), rope="half_theta")


# --- the row tag -----------------------------------------------------------------------------------


def test_row_tag_round_trips_and_malformed_tags_are_refused():
    tag = RowTag(
        job="j",
        group="j:2",
        row=2,
        rows=3,
        base=5,
        combination=Combination(beta=0.5, pooling="max_prob", eta=0.1, top_p=0.9),
        draw=Draw(greedy=False, temperature=0.7, top_k=40, top_p=0.95, seed=3),
    )
    extra = tag.to_extra_args()
    assert RowTag.from_extra_args(extra) == tag
    assert RowTag.from_extra_args({"other": 1}) is None and RowTag.from_extra_args(None) is None
    for broken in (
        {"nbce": {"job": "j"}},
        {"nbce": {**extra["nbce"], "row": 3}},
        {"nbce": {**extra["nbce"], "combination": {"pooling": "median"}}},
    ):
        with pytest.raises(ValueError, match="extra_args.nbce"):
            RowTag.from_extra_args(broken)
    # The strategy's defaults are the protocol's.
    params = NbceParams()
    assert Combination(params.beta, params.pooling, params.eta, params.top_p) == Combination()


# --- the combination against the formulas, written out -------------------------------------------


def published_step(
    logits: torch.Tensor, beta: float, pooling: str, eta: float, prev: int | None, top_p: float | None
) -> tuple[torch.Tensor, int | None]:
    """bojone/NBCE test.py step by step, row by row, in plain loops (row 0 unconditioned)."""
    rows = []
    for row in logits:
        lp = row - row.logsumexp(dim=-1)
        if top_p is not None:
            order = lp.argsort(descending=True)
            keep, mass = [], 0.0
            for t in order.tolist():  # most likely first, until the mass reaches top_p
                keep.append(t)
                mass += float(lp[t].exp())
                if mass >= top_p:
                    break
            masked = torch.full_like(lp, float("-inf"))
            masked[keep] = lp[keep]
            lp = masked
        rows.append(lp)
    k: int | None
    if pooling == "mean":
        k, pooled = None, sum(rows[1:]) / (len(rows) - 1)
        if not torch.isfinite(pooled).any():  # no token in every nucleus: their average probability
            pooled = torch.log(sum(r.exp() for r in rows[1:]) / (len(rows) - 1))
    elif pooling == "max_prob":
        scores = [float(r.max()) + (eta if prev == i + 1 else 0.0) for i, r in enumerate(rows[1:])]
        k = scores.index(max(scores)) + 1
        pooled = rows[k]
    else:
        entropies = [
            float(-(r.exp() * r.clip(-100, 0)).sum()) - (eta if prev == i + 1 else 0.0) for i, r in enumerate(rows[1:])
        ]
        k = entropies.index(min(entropies)) + 1
        pooled = rows[k]
    merged = torch.where(rows[0] > -100, (1 + beta) * pooled - beta * rows[0], pooled)
    return merged, k


@pytest.mark.parametrize("pooling", ["min_entropy", "max_prob", "mean"])
@pytest.mark.parametrize(("eta", "prev"), [(0.0, None), (0.3, 2), (5.0, 3)])
@pytest.mark.parametrize("top_p", [None, 0.9])
def test_combination_equals_the_published_formula(pooling, eta, prev, top_p):
    torch.manual_seed(hash((pooling, eta, top_p)) % 1000)
    logits = torch.randn(5, 300) * 3
    got, k = combine(logits, Combination(beta=0.25, pooling=pooling, eta=eta, top_p=top_p), prev)
    expected, k_expected = published_step(logits, 0.25, pooling, eta, prev, top_p)
    assert k == k_expected
    torch.testing.assert_close(got, expected)


def test_a_large_eta_keeps_the_previous_row():
    logits = torch.randn(4, 200) * 3
    _, first = combine(logits, Combination())
    other = 1 if first != 1 else 2
    _, kept = combine(logits, Combination(eta=100.0), prev_k=other)
    assert first is not None and kept == other


def test_top_p_filter_keeps_the_smallest_nucleus():
    logp = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = torch.isfinite(top_p_filter(logp, 0.8)).tolist()
    assert kept == [True, True, False, False]
    assert torch.isfinite(top_p_filter(logp, None)).all()


def test_mean_pooling_over_nuclei_without_a_common_token_pools_their_mixture():
    """Each context row is sure of a different token, so with top_p 0.5 no token is in every
    nucleus: the mean of log-probabilities is -inf everywhere. The step pools the rows' average
    probability instead, and the token is one of the rows' nucleus tokens, greedy or sampled."""
    logits = torch.zeros(3, 50)
    logits[0, 7] = 5.0  # the unconditioned row
    logits[1, 10] = 12.0
    logits[2, 20] = 10.0
    merged, k = combine(logits, Combination(pooling="mean", top_p=0.5))
    assert k is None
    assert torch.isfinite(merged).nonzero().flatten().tolist() == [10, 20]
    # Outside the unconditioned row's nucleus (token 7) nothing is subtracted: merged = pooled.
    probs = logits.softmax(dim=-1)
    torch.testing.assert_close(merged[[10, 20]], torch.log(torch.stack([probs[1, 10], probs[2, 20]]) / 2))
    assert choose_token(merged, Draw(), "job", 0) == 10
    sampled = {choose_token(merged, Draw(greedy=False, top_k=5, top_p=0.9), "job", i) for i in range(40)}
    assert sampled <= {10, 20}
    # Where the nuclei do share a token, mean pooling stays the plain average of log-probabilities.
    logits[2, 10] = 11.0
    merged, _ = combine(logits, Combination(pooling="mean", top_p=0.5))
    logp = top_p_filter(logits.log_softmax(dim=-1), 0.5)
    pooled = logp[1:].mean(0)
    torch.testing.assert_close(merged, torch.where(logp[0] > -100, 1.25 * pooled - 0.25 * logp[0], pooled))


def test_choose_token_never_raises_inside_the_engine():
    for scores in (torch.full((8,), float("-inf")), torch.full((8,), float("nan"))):
        assert 0 <= choose_token(scores, Draw(greedy=False, top_p=0.5), "job", 0) < 8
    # The largest seed a request may carry (it overflowed the generator's 64-bit seed).
    assert 0 <= choose_token(torch.randn(8), Draw(greedy=False, seed=2**63 - 1), "job", 7) < 8


def test_more_documents_than_one_engine_step_runs_are_refused_before_any_is_tokenized(tokenizer, context):
    texts: list[str] = []

    class Counting:
        all_special_ids: list[int] = []

        def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
            texts.append(text)
            return tokenizer.encode(text, add_special_tokens=add_special_tokens)

    limited = dataclasses.replace(context, max_rows=8)
    with pytest.raises(StrategyError, match="needs 100001 rows") as err:
        nbce_plan(Counting(), limited, StrategyRequest("Q?", tuple(f"doc {i}" for i in range(100_000)), 8))
    assert err.value.field == "context" and "8 rows" in err.value.message and texts == []
    # A string context: its chunks are counted before the rows are built.
    with pytest.raises(StrategyError, match="rows"):
        nbce_plan(tokenizer, limited, StrategyRequest("Q?", (essay(60),), 8), chunk_tokens=32)
    assert len(nbce_plan(tokenizer, limited, StrategyRequest("Q?", tuple(f"doc {i}" for i in range(7)), 8)).rows) == 8
