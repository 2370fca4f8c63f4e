"""The priority and soak benchmarks' pieces that need no server: percentiles, documents and their
lengths, request bodies, the arrival mix, Retry-After checks, argument parsing, the summary."""

from __future__ import annotations

import argparse
import collections
import json
import random

import pytest

from clients import bench_priority, bench_soak
from clients.bench_passkey import load_token_counter
from clients.bench_priority import Outcome, PhaseResult, completion_body, event_of, long_document, percentile


def parser_for(module: object) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)  # type: ignore[attr-defined]
    return parser


def test_percentiles_interpolate_between_ranks() -> None:
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentile(values, 50) == 3.0
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 5.0
    assert percentile(values, 95) == pytest.approx(4.8)  # numpy.percentile's default
    assert percentile([7.0], 95) == 7.0
    assert percentile([1.0, 2.0], 25) == pytest.approx(1.25)
    assert percentile([], 50) != percentile([], 50)  # NaN: nothing measured


def test_the_long_document_has_about_the_asked_tokens_and_no_shared_prefix() -> None:
    count = load_token_counter(None)
    assert count is not None
    context, question = long_document(3000, seed=1, count=count)
    assert 2850 <= count(context + "\n\n" + question) <= 3000
    other, _ = long_document(3000, seed=2, count=count)
    # Another phase's document differs from its start on (past the shared instruction).
    assert context[:400] != other[:400]
    assert long_document(3000, seed=1, count=count) == (context, question)


def test_bodies_carry_priority_only_when_asked() -> None:
    plain = completion_body("Hi 0!", 4, None)
    assert plain == {"prompt": "Hi 0!", "max_tokens": 4, "temperature": 0, "stream": True}
    urgent = completion_body("q", 4, -1, context="doc", strategy={"name": "dca"})
    assert (urgent["priority"], urgent["context"], urgent["strategy"]) == (-1, "doc", {"name": "dca"})
    assert completion_body("q", 4, 0)["priority"] == 0


def test_sse_lines() -> None:
    assert event_of('data: {"choices": [{"text": "x"}]}') == {"choices": [{"text": "x"}]}
    assert event_of("data: [DONE]") is None and event_of(": keep-alive") is None and event_of("") is None


def test_priority_arguments_and_phases() -> None:
    args = parser_for(bench_priority).parse_args([])
    assert (args.phases, args.long_tokens, args.strategy, args.short_priority) == (
        ["plain", "priority"],
        24000,
        "dca",
        -1,
    )
    args = parser_for(bench_priority).parse_args(["--phases", "fcfs,priority", "--long-tokens", "12k"])
    assert args.phases == ["fcfs", "priority"] and args.long_tokens == 12000
    with pytest.raises(SystemExit):
        parser_for(bench_priority).parse_args(["--phases", "plain,bogus"])


def test_the_table_shows_percentiles_and_counts_refusals_apart() -> None:
    shorts = [Outcome(200, t) for t in (1.0, 2.0, 3.0, 4.0)] + [Outcome(429, error="busy"), Outcome(0, error="hung")]
    result = PhaseResult("http://a", "priority", Outcome(200, 300.0, 305.0), shorts)
    table = bench_priority.table([result])
    assert "| http://a | priority | 300.0 | 305.0 | 4 | 2.5 | 3.9 | 4.0 | 1 / 1 |" in table
    unanswered = PhaseResult("http://a", "plain", Outcome(0, None, 9.0, "ReadTimeout"), [])
    assert "| – (0 ReadTimeout) |" in bench_priority.table([unanswered])


def test_the_cli_knows_the_priority_benchmark() -> None:
    from clients.cli import build_parser

    args = build_parser().parse_args(["bench", "priority", "--url", "http://x", "--shorts", "3"])
    assert args.bench == "priority" and args.shorts == 3


def test_soak_default_mix_is_unchanged_and_long_documents_are_an_option() -> None:
    args = parser_for(bench_soak).parse_args([])
    assert not args.long_documents and bench_soak.argument_problem(args) is None
    assert [bench_soak.arrival_kind(i, 0) for i in range(10)] == list(bench_soak.KINDS) * 2
    mixed = [bench_soak.arrival_kind(i, 4) for i in range(12)]
    assert mixed == [
        "native",
        "rope",
        "nbce",
        "long",
        "stream",
        "disconnect",
        "native",
        "long",
        "rope",
        "nbce",
        "stream",
        "long",
    ]
    args = parser_for(bench_soak).parse_args(["--long-documents", "--long-min-tokens", "12k", "--long-every", "5"])
    assert (args.long_min_tokens, args.long_max_tokens, args.long_every) == (12000, 24000, 5)
    bad = parser_for(bench_soak).parse_args(["--long-documents", "--long-min-tokens", "30k"])
    assert "long-min-tokens" in (bench_soak.argument_problem(bad) or "")


def test_soak_costly_requests_cycle_through_the_probes_parameters_on_fresh_documents() -> None:
    rng = random.Random(0)
    requests = [bench_soak.costly_body(n, rng, 16) for n in range(len(bench_soak.COSTLY))]
    for (route, body), (costly_route, extra) in zip(requests, bench_soak.COSTLY, strict=True):
        assert route == costly_route and {k: body[k] for k in extra} == extra
    count = load_token_counter(None)
    assert count is not None
    texts = [body.get("context") or body["prompt"] for _, body in requests]
    assert all(3_200 <= count(t) <= 3_400 for t in texts) and len({t[:200] for t in texts}) == len(texts)
    assert bench_soak.argument_problem(parser_for(bench_soak).parse_args(["--costly-every", "-1"]))


def test_soak_long_documents_lengths_and_strategies() -> None:
    rng = random.Random(0)
    bodies = [bench_soak.long_body(n, rng, 12_000, 24_000, 16) for n in range(len(bench_soak.LONG_STRATEGIES))]
    assert [b["strategy"] for b in bodies] == bench_soak.LONG_STRATEGIES
    count = load_token_counter(None)
    assert count is not None
    for b in bodies:
        documents = b["context"] if isinstance(b["context"], list) else [b["context"]]
        tokens = sum(count(d) for d in documents)
        assert 11_990 <= tokens <= 24_000, (b["strategy"], tokens)
    assert isinstance(bodies[bench_soak.LONG_STRATEGIES.index("nbce")]["context"], list)
    # Fresh text: no two documents share their opening.
    assert len({json.dumps(b["context"])[:200] for b in bodies}) == len(bodies)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("30", None),
        ("1", None),
        (None, "missing-retry-after"),
        ("0", "bad-retry-after"),
        ("soon", "bad-retry-after"),
        ("2.5", "bad-retry-after"),
    ],
)
def test_a_429_needs_a_retry_after_of_whole_seconds(value: str | None, problem: str | None) -> None:
    assert bench_soak.retry_after_problem(value) == problem


def test_soak_summary_passes_only_without_lost_hung_or_bare_429() -> None:
    good = {"native": collections.Counter({"200": 5, "429": 3}), "long": collections.Counter({"429": 2, "200": 1})}
    line, passed = bench_soak.summary(good)
    assert (
        passed and "11 requests: 6 served, 5 refused with 429 + Retry-After, 0 refused with 422, 0 lost, 0 hung" in line
    )
    for failure in ("lost", "hung", "missing-retry-after"):
        assert not bench_soak.summary({"long": collections.Counter({"200": 1, failure: 1})})[1]
