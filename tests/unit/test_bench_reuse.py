"""`ropeserve bench reuse` without a server: its documents, its reading of /metrics, its streamed
requests (against a stub transport) and its table."""

from __future__ import annotations

import json

import httpx
from prometheus_client import generate_latest

from clients.bench_reuse import (
    FIRST_QUESTION,
    SECOND_QUESTION,
    Asked,
    ask,
    make_reuse_case,
    prefix_cache_counters,
    table,
)
from clients.cli import build_parser
from server.engines.base import EngineIteration, FinishedRow
from server.ops.metrics import Metrics


class StubEngine:  # what the metrics listener reads of an engine
    kind = "vllm"


def words(text: str) -> int:
    return len(text.split())


def test_each_strategy_gets_a_fresh_document_with_its_key_and_the_second_question_is_longer() -> None:
    one = make_reuse_case(3000, seed=7, index=0, count=words)
    again = make_reuse_case(3000, seed=7, index=0, count=words)
    other = make_reuse_case(3000, seed=7, index=1, count=words)
    next_run = make_reuse_case(3000, seed=8, index=0, count=words)
    assert one == again  # reproducible from the seed
    assert len({one.context, other.context, next_run.context}) == 3
    assert one.key in one.context and len(one.key) == 5
    assert 2800 <= words(one.context + "\n\n" + one.first) <= 3000
    assert words(one.second) > words(one.first)
    assert one.second.split()[0] != one.first.split()[0]  # only the document is shared
    assert (one.first, one.second) == (FIRST_QUESTION, SECOND_QUESTION)


def test_the_counters_are_read_from_the_servers_exposition() -> None:
    m = Metrics(gpu=False)
    m.init_strategies(["yarn", "dca"])
    m.track_request("a" * 32, "yarn")
    m.engine_listener(StubEngine(), EngineIteration(finished=(FinishedRow("a" * 32, 0, 0, 1600, 1536),)))
    text = generate_latest(m.registry).decode()
    assert prefix_cache_counters(text, "yarn") == (1600, 1536)
    assert prefix_cache_counters(text, "dca") == (0, 0)
    assert prefix_cache_counters("# an older server\nropeserve_requests_total 1\n", "yarn") is None


def stub_server(hits_after: float) -> httpx.Client:
    """/metrics that counts one request of `yarn` (1,000 tokens queried) once a completion ran, and a
    streamed completion of two chunks."""
    state = {"done": False}

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/metrics":
            queries, hits = (1000.0, hits_after) if state["done"] else (0.0, 0.0)
            text = (
                "# TYPE ropeserve_prefix_cache_queries_total counter\n"
                f'ropeserve_prefix_cache_queries_total{{strategy="yarn"}} {queries}\n'
                "# TYPE ropeserve_prefix_cache_hits_total counter\n"
                f'ropeserve_prefix_cache_hits_total{{strategy="yarn"}} {hits}\n'
            )
            return httpx.Response(200, text=text)
        body = json.loads(request.content)
        assert body["stream"] is True and body["context"] == "a document" and body["strategy"] == {"name": "yarn"}
        state["done"] = True
        chunks = [{"choices": [{"text": " 123"}]}, {"choices": [{"text": "45."}]}]
        sse = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        return httpx.Response(200, text=sse, headers={"content-type": "text/event-stream"})

    return httpx.Client(base_url="http://stub", transport=httpx.MockTransport(handle))


def test_a_request_is_streamed_timed_and_its_prefix_cache_hits_counted() -> None:
    with stub_server(hits_after=896) as client:
        asked = ask(client, {"name": "yarn"}, "a document", "a question", new_tokens=4)
    assert asked.error == ""
    assert asked.text == " 12345."
    assert asked.ttft_s is not None and 0 <= asked.ttft_s <= asked.seconds
    assert (asked.queried_tokens, asked.cached_tokens) == (1000, 896)


def result(strategy: str, first: Asked, second: Asked, key: str = "12345") -> dict:
    from dataclasses import asdict

    return {"strategy": {"name": strategy}, "key": key, "first": asdict(first), "second": asdict(second)}


def test_the_table_shows_the_ratio_against_the_goal_hits_and_answers() -> None:
    results = {
        "length": 16000,
        "seed": 3,
        "rows": [
            result("yarn", Asked(40.0, 41.0, " 12345", "", 16000, 0), Asked(2.0, 3.0, " 12345", "", 16030, 15872)),
            result("nbce", Asked(20.0, 21.0, " 999", "", 32000, 16000), Asked(10.0, 11.0, " 12345", "", None, None)),
            result("dca", Asked(error="429: busy"), Asked()),
        ],
    }
    lines = table(results).splitlines()
    assert lines[0].startswith("Document of 16,000 tokens (seed 3)")
    yarn, nbce, dca = lines[4:]
    assert yarn == '| `{"name":"yarn"}` | 40.00 | 2.00 | 0.050 | 0 / 15,872 (of 16,030) | yes / yes |'
    assert "0.500 (over the goal)" in nbce and "16,000 / – (of –)" in nbce and "no / yes" in nbce
    assert dca.endswith("| 429: busy |")


def test_the_benchmark_is_a_ropeserve_bench_command() -> None:
    args = build_parser().parse_args(["bench", "reuse", "--length", "4k", "--strategies", "yarn:factor=4;dca"])
    assert (args.bench, args.length, args.strategies, args.seed) == ("reuse", "4k", "yarn:factor=4;dca", None)
