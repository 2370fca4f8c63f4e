"""The varied-text tasks without a server: documents, fact insertion, probes, scoring, the cost
reading, the plots and the policy they rank. A corpus of numbered sentences stands in for the
novels (so positions are checkable) and one token is one word."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import httpx
import pytest

from clients.eval import continuation, distant_copy, documents, fact_recall, plots, varied
from clients.eval.documents import Document, boundary_at, cell_rng, draw, fit, reflow, split_sentences
from clients.eval.policy import measured_policy
from clients.eval.results import EvalResults, Score
from clients.eval.server_meter import Reading, ServerMeter, counter_total
from server.engines.base import ModelFacts
from strategies.auto_policy import AutoPolicy
from strategies.base import PlanContext, StrategyRequest
from strategies.registry import default_registry
from tests.support.planning import plan_with

MODEL = ModelFacts("m", 8192, {"rope_type": "default", "rope_theta": 100000.0}, 64, 49152, max_context_tokens=40_000)


def words(text: str) -> int:
    return len(text.split())


def fake_corpus() -> dict[str, list[str]]:
    """Two 'novels' of 300 paragraphs, each of three distinct long sentences."""
    corpus = {}
    for title in ("first", "second"):
        corpus[title] = [
            " ".join(
                f"Sentence {s} of paragraph {p} in the {title} book says that the weather {s + p} was "
                f"remarkably fine for walking to town and back {p * 3 + s} times."
                for s in range(3)
            )
            for p in range(300)
        ]
    return corpus


@pytest.fixture
def corpus(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    books = fake_corpus()
    monkeypatch.setattr(documents, "_corpus", lambda: books)
    return books


def test_paragraphs_are_reflowed_and_split_into_sentences() -> None:
    assert reflow("CHAPTER I\n\n\nIt is a truth\nuniversally  acknowledged.\n\n") == [
        "CHAPTER I",
        "It is a truth universally acknowledged.",
    ]
    assert split_sentences('Mr. Darcy bowed. "Is it so?" said Mrs. Bennet. Dr. Grant smiled! Yes.') == [
        "Mr. Darcy bowed.",
        '"Is it so?" said Mrs. Bennet.',
        "Dr. Grant smiled!",
        "Yes.",
    ]


def test_a_document_is_its_sentences_and_an_insertion_lands_at_a_sentence_boundary() -> None:
    doc = Document.from_paragraphs(["One. Two. Three.", "Four."])
    assert doc.text == "One. Two. Three.\n\nFour."
    assert doc.starts() == [0, 5, 10, 18] and doc.prefix(3) == "One. Two. Three.\n\n"
    assert boundary_at(doc, 0.5, words) == 2 and boundary_at(doc, 0.5, words, {2}) in (1, 3)
    assert boundary_at(doc, 0.0, words) == 1  # something of the document always comes first
    doc.insert(3, "Fact.")  # before "Four.", in its paragraph
    assert doc.text == "One. Two. Three.\n\nFact. Four."
    assert fit(doc, 3, words).text == "One. Two. Three."


def test_drawn_documents_fit_their_length_and_every_cell_reads_fresh_text(corpus) -> None:
    sources = set()
    for tokens in (300, 2000):
        for index in range(3):
            doc = draw(tokens, words, cell_rng("task", tokens, 0, index))
            assert tokens - 40 <= words(doc.text) <= tokens  # filled to within a sentence
            sources.add(doc.source)
    assert len(sources) == 6  # a different book or paragraph for each length and index
    again = draw(300, words, cell_rng("task", 300, 0, 0))
    assert again.text == draw(300, words, cell_rng("task", 300, 0, 0)).text  # the same for every strategy
    other = draw(300, words, random.Random(1), avoid=again.source.split(":")[0])
    assert other.source.split(":")[0] != again.source.split(":")[0]


def test_facts_are_inserted_once_each_at_spread_depths(corpus) -> None:
    doc, placed = fact_recall.document(2000, words, 8, seed=0, index=0)
    text = doc.text
    assert words(text) <= 2000
    positions = [at for _, at in placed]
    assert positions == sorted(positions)
    for (fact, at), depth in zip(placed, documents.spread(8), strict=True):
        assert text.count(fact.sentence) == 1 and text.count(fact.answer) == 1
        assert abs(at / words(text) - depth) < 0.05  # where it was aimed
        assert words(doc.prefix(doc.sentences.index(fact.sentence))) == at
    facts = [f for f, _ in placed]
    people = [[name for name in fact_recall.SURNAMES if name in f.sentence] for f in facts]
    assert all(len(p) == 1 for p in people) and len({p[0] for p in people}) == 8  # eight different people
    assert len({f.answer for f in facts}) == 8
    for f in facts:  # the three probe styles: the fact's own words, other words, a question
        assert f.sentence.startswith(fact_recall.probe_text(f, "restated"))
        assert not f.sentence.startswith(fact_recall.probe_text(f, "paraphrased"))
        assert fact_recall.probe_text(f, "question").endswith("Answer:")
        assert f.answer not in fact_recall.probe_text(f, "paraphrased")
    # Each style draws its own document (a cell of one never finds another's in the prefix cache).
    assert fact_recall.document(2000, words, 8, 0, 0, "question")[0].source != doc.source


def test_fact_scoring_takes_the_first_number_the_model_writes() -> None:
    fact = fact_recall.facts(random.Random(0), 1)[0]
    assert fact_recall.score(f" {fact.answer}.", fact) == 1.0
    assert fact_recall.score(f" {int(fact.answer) + 1} or {fact.answer}", fact) == 0.0
    assert fact_recall.score(" a great many", fact) == 0.0
    with pytest.raises(ValueError, match="one per template"):
        fact_recall.facts(random.Random(0), len(fact_recall.TEMPLATES) + 1)


def test_continuation_cues_point_at_one_sentence_and_score_the_words_that_follow(corpus) -> None:
    probed = continuation.cases(3000, words, 6, seed=0, index=0)
    assert len(probed.cases) == 6
    for case in probed.cases:
        assert probed.text.count(case.inputs) == 1 and len(case.inputs.split()) == continuation.CUE_WORDS
        after = probed.text.split(case.inputs, 1)[1]
        assert continuation.words(after)[: continuation.TARGET_WORDS] == case.expected.split()
        assert case.score(after) == 1.0 and case.score(" nothing like it") == 0.0
        half = " ".join(after.split()[:5]) + " but then something else entirely"
        assert case.score(half) == pytest.approx(0.5)
    positions = [c.position for c in probed.cases]
    assert positions == sorted(positions) and positions[0] < 3000 * 0.2 and positions[-1] > 3000 * 0.8


def test_distant_copy_repeats_passages_of_the_document_beside_controls_from_elsewhere(corpus) -> None:
    vocabulary: dict[str, int] = {}

    def encode(text: str) -> list[int]:
        return [vocabulary.setdefault(w, len(vocabulary)) for w in re.findall(r"\S+|\n\n", text)]

    ids, segments, source = distant_copy.build(3000, encode, 4, seed=0, index=0)
    assert len(ids) <= 3000 and [s.kind for s in segments] == ["copy", "control"] * 4
    n = distant_copy.PASSAGE_TOKENS
    for seg in segments:
        span = ids[seg.start : seg.start + n]
        if seg.kind == "copy":
            assert seg.original is not None and span == ids[seg.original : seg.original + n]
        else:  # a passage of the other book: not in the document
            assert seg.original is None and len(span) == n
            assert not any(ids[i : i + n] == span for i in range(segments[0].start - n))
    assert [s.original for s in segments if s.original is not None] == sorted(
        s.original for s in segments if s.original is not None
    )
    assert source.split(":")[0] in ("first", "second")
    # Scoring: the fraction of a segment's tokens, after SKIP, that the model ranked first.
    first = [False] * len(ids)
    for i in range(segments[0].start + distant_copy.SKIP, segments[0].start + n):
        first[i] = True
    scored = distant_copy.segment_scores(segments, first, [-0.5] * len(ids))
    assert scored[0]["score"] == 1.0 and scored[1]["score"] == 0.0 and scored[0]["mean_logprob"] == -0.5
    assert scored[0]["distance"] == segments[0].start - segments[0].original and scored[1]["distance"] is None
    assert distant_copy.ranked_first([None, -0.1, -2.0], [None, {"a": -0.1, "b": -2.5}, {"c": -2.0, "d": -0.3}]) == [
        False,
        True,
        False,
    ]


def test_a_cell_asks_a_few_documents_when_they_are_short() -> None:
    assert varied.layout(1000, 20) == (4, 5) and varied.layout(6000, 20) == (15, 2)
    assert varied.layout(8000, 20) == (20, 1) and varied.layout(32000, 40) == (20, 2)


def test_the_cost_comes_from_the_servers_counters() -> None:
    text = (
        "# HELP ropeserve_prefix_cache_hits_total x\n"
        'ropeserve_prefix_cache_hits_total{strategy="native"} 100.0\n'
        'ropeserve_prefix_cache_hits_total{strategy="rerope"} 28.0\n'
        'ropeserve_prefix_cache_hits_created{strategy="native"} 1.7e9\n'
    )
    assert counter_total(text, "ropeserve_prefix_cache_hits_total") == 128.0
    before, after = Reading(10.0, 50.0, 1000.0, 0.0), Reading(25.5, 80.25, 9000.0, 6000.0)
    assert after.since(before) == {"wall_s": 15.5, "cpu_s": 30.25, "cache_queries": 8000.0, "cache_hits": 6000.0}
    assert Reading(1.0, None, 0.0, 0.0).since(before)["cpu_s"] is None


def varied_grid() -> EvalResults:
    """native and two window strategies at 8k and 16k on fact_recall (0/1) and continuation
    (continuous), with per-trial records at known distances; passkey too, not ranked by."""
    names = ["native", "rerope", "dca"]
    results = EvalResults("m", 8192, names, [{"name": n} for n in names], [8000, 16000])
    table = {  # (strategy, length): (fact_recall correct of 20, continuation mean)
        ("native", 8000): (14, 0.25), ("rerope", 8000): (18, 0.40), ("dca", 8000): (17, 0.50),
        ("native", 16000): None, ("rerope", 16000): (12, 0.20), ("dca", 16000): (15, 0.25),
    }  # fmt: skip
    for (name, length), cell in table.items():
        if cell is None:
            for task in ("fact_recall", "continuation", "passkey"):
                results.score(task, name, length).refused = "422: longer than the window"
            continue
        facts, mean = cell
        records = [{"distance": 500 + 1000 * i, "score": float(i < facts)} for i in range(20)]
        results.record("fact_recall", name, length, Score(correct=facts, trials=20, seconds=2.0, records=records,
                                                          cost={"wall_s": 30.0, "cpu_s": 55.0}))  # fmt: skip
        results.record("continuation", name, length, Score(correct=mean * 20, trials=20, seconds=3.0,
                                                           continuous=True, baseline=0.02))  # fmt: skip
        results.record("passkey", name, length, Score(correct=5 if name == "native" else 1, trials=5))
    return results


def test_the_policy_ranks_by_the_named_tasks_and_names_them() -> None:
    results = varied_grid()
    policy = AutoPolicy.model_validate(measured_policy(results, "test", only=["fact_recall", "continuation"]))
    at_8k, at_16k = policy.bands
    # The mean of fact_recall and continuation: dca (0.85 + 0.50) / 2, rerope (0.90 + 0.40) / 2, native.
    assert [(c.label, c.score) for c in at_8k.ranked] == [("dca", 0.675), ("rerope", 0.65), ("native", 0.475)]
    assert at_8k.ranked[1].tasks == {"fact_recall": "18/20", "continuation": "0.40 of 20"}
    assert at_8k.ranked[0].measured_on == "varied text (Austen's novels)"
    assert [c.label for c in at_16k.ranked] == ["dca", "rerope"]  # native refused: no candidate
    # Ranked by every task measured, passkey (the memorized haystack) would put native first.
    assert measured_policy(results, "test")["bands"][0]["ranked"][0]["label"] == "native"


def test_autos_reason_names_the_varied_text_cell() -> None:
    results = varied_grid()
    raw = measured_policy(results, "ropeserve eval (docs/eval/varied/results.json)", ["fact_recall", "continuation"])
    policy = AutoPolicy.model_validate(raw)
    context = PlanContext(MODEL, default_registry(), {"auto_policy": policy})
    one_per_character = lambda text: [1] * len(text)  # noqa: E731
    plan = plan_with(context, "auto", StrategyRequest("Words. " * 1715, (), 8), one_per_character)  # 12,005 tokens
    reason = plan.resolved["reason"]
    assert plan.resolved["chosen"]["name"] == "dca"
    assert "measured at 16000 tokens on varied text (Austen's novels): fact_recall 15/20, continuation 0.25 of 20" in (
        reason
    )
    assert "docs/eval/varied/results.json" in reason and plan.resolved["policy"]["measured_on"].startswith("varied")


def test_the_varied_grid_draws_a_heatmap_and_a_score_by_distance_plot_per_task(tmp_path: Path) -> None:
    results = varied_grid()
    assert plots.by_distance(results, "fact_recall", "native") == [
        (1000, 1.0, 1), (2000, 1.0, 1), (4000, 1.0, 2), (6000, 1.0, 2), (8000, 1.0, 2), (12000, 1.0, 4),
        (16000, 0.5, 4), (24000, 0.0, 4),
    ]  # fmt: skip
    written = {p.name for p in plots.write_all(results, tmp_path)}
    assert {"fact_recall.png", "fact_recall_by_distance.png", "continuation.png", "results.md"} <= written
    assert "continuation_by_distance.png" not in written  # no per-trial records: nothing to bin
    table = (tmp_path / "results.md").read_text()
    assert "| rerope | 0.40 of 20 (3 s); base 0.02 | 0.20 of 20 (3 s); base 0.02 |" in table
    assert "| native | 14/20 (2 s) | n/a |" in table
    assert "| native | 30 / 55; 0 | – |" in table  # the cost table: wall / CPU seconds; cached tokens


def test_a_score_keeps_its_records_and_baseline_through_results_json_and_a_second_seed(tmp_path: Path) -> None:
    results = varied_grid()
    results.save(tmp_path / "results.json")
    again = EvalResults.load(tmp_path / "results.json")
    assert again == results
    cell = again.score("continuation", "dca", 8000)
    cell.records = [{"score": 0.5}]
    again.record("continuation", "dca", 8000, Score(correct=2, trials=20, continuous=True, baseline=0.04,
                                                    records=[{"score": 0.1}], seeds=[1]))  # fmt: skip
    assert cell.trials == 40 and cell.baseline == pytest.approx(0.03) and len(cell.records) == 2
    assert cell.describe() == "0.30 of 40"  # (0.50 x 20 + 2) / 40


class FakeServer:
    """/generate answering each fact probe with its number (a continuation probe with the words
    that follow its cue), and /metrics counting a document's prompt tokens as cached after its first
    request: the HTTP plumbing of a cell, without an engine."""

    def __init__(self, text_of: dict[str, str], refuse: bool = False) -> None:
        self.text_of, self.refuse = text_of, refuse
        self.bodies: list[dict] = []
        self.seen: set[str] = set()
        self.queries = self.hits = 0.0

    def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/metrics":
            return httpx.Response(200, text=f"ropeserve_prefix_cache_queries_total{{strategy=\"x\"}} {self.queries}\n"
                                             f"ropeserve_prefix_cache_hits_total{{strategy=\"x\"}} {self.hits}\n")  # fmt: skip
        body = json.loads(request.content)
        self.bodies.append(body)
        if self.refuse:
            return httpx.Response(422, json={"error": "context: too long for this strategy"})
        strategy = {"name": "auto", "chosen": {"name": "native"}, "reason": "test"}
        if body.get("dry_run"):
            return httpx.Response(200, json={"dry_run": True, "strategy": strategy})
        document = body.get("context") or ""
        tokens = words(document)
        self.queries += tokens
        if document in self.seen:
            self.hits += tokens
        self.seen.add(document)
        answer = self.text_of.get(body["inputs"], " nothing") if document else " nothing at all"
        return httpx.Response(200, json={"generated_text": answer, "strategy": strategy})


def run_cell(server: FakeServer, task: str, length: int, probes: int) -> Score:
    client = httpx.Client(transport=httpx.MockTransport(server.handle), base_url="http://test")
    return varied.generation_cell(client, ServerMeter(client, None), task, {"name": "auto"}, length, 8192, probes,
                                  words, seed=0)  # fmt: skip


def test_a_generation_cell_asks_each_documents_probes_after_it_and_records_the_trials(corpus) -> None:
    answers: dict[str, str] = {}
    for index in range(2):  # the facts the cell will insert, answered right by the fake server
        probed = fact_recall.cases(1000 - fact_recall.MAX_NEW_TOKENS - varied.PROBE_TOKENS, words, 4, 0, index)
        answers.update({case.inputs: f" {case.expected}." for case in probed.cases})
    server = FakeServer(answers)
    score = run_cell(server, "fact_recall", 1000, 8)
    assert (score.correct, score.trials, score.refused) == (8, 8, None)
    assert [r["doc"] for r in score.records] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert score.served["dry_run"]["chosen"] == {"name": "native"} and server.bodies[0]["dry_run"] is True
    assert sum(1 for b in server.bodies if b.get("dry_run")) == 1  # one dry run a cell
    firsts = [r["first_probe_cache"] for r in score.records if "first_probe_cache" in r]
    assert len(firsts) == 2 and all(f["cache_hits"] == 0 and f["cache_queries"] > 800 for f in firsts)
    depths = [r["depth"] for r in score.records[:4]]
    assert depths == sorted(depths) and all(0 < r["distance"] < 1000 for r in score.records)
    assert score.cost["cache_hits"] > 0 and score.cost["cpu_s"] is None  # later probes: cached; no pid


def test_continuation_asks_its_baseline_of_native_without_the_document(corpus) -> None:
    probed = continuation.cases(1000 - continuation.MAX_NEW_TOKENS - varied.PROBE_TOKENS, words, 4, 0, 0)
    server = FakeServer({case.inputs: " " + case.expected for case in probed.cases})
    score = run_cell(server, "continuation", 1000, 4)
    assert score.trials == 4 and score.accuracy == 1.0 and score.baseline == 0.0 and score.continuous
    alone = [b for b in server.bodies if not b.get("context") and not b.get("dry_run")]
    assert len(alone) == 4 and all(b["strategy"] == {"name": "native"} for b in alone)


def test_a_refused_cell_keeps_the_servers_reason_and_no_trials(corpus) -> None:
    score = run_cell(FakeServer({}, refuse=True), "fact_recall", 1000, 4)
    assert score.refused == "422: context: too long for this strategy" and score.trials == 0
