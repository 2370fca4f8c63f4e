"""A fleet with document affinity: two replicas on this host (real engines, one core each) behind a
real vLLM router (PyPI vllm-router, `--policy consistent_hash`). The Python client sends each
request with a `context` under the document's key (`X-Session-Id`), which the router hashes onto one
replica: a second question on a document is served by the replica that read it, from its prefix
cache. `strategy`, `context` and a preset pass through the router unchanged.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from clients.bench_scaling import replica_that_served, requests_served, vllm_router
from clients.client import ROUTING_HEADER, RopeserveClient, document_routing_key
from tests.conftest import RunningServer, start_server, stop_server
from tests.support.documents import report
from tests.support.metrics_text import sample_value

pytestmark = [
    pytest.mark.engine,
    pytest.mark.long_tier,
    pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="two replicas take a core each"),
]

# ~2,000 tokens: enough that reading it again costs far more than finding it in the cache.
DOCUMENT = report(170, seed=11)
QUESTIONS = ("Question: what did the night clerk inspect?\nAnswer:", "Question: which ship left first?\nAnswer:")
YARN = {"name": "yarn", "factor": 2}


@dataclass
class Fleet:
    router: str
    replicas: list[RunningServer]

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self.replicas]

    def served_by(self, send: Any) -> tuple[int, Any]:
        """The index of the one replica that served `send()`, and what `send()` returned."""
        before = [requests_served(url) for url in self.urls]
        result = send()
        replica = replica_that_served(self.urls, before)
        assert replica >= 0, "not exactly one replica served it"
        return replica, result


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Replica k bound to core k with a small KV cache, both started at once, then the router."""
    logs = tmp_path_factory.mktemp("fleet")
    env = {"ROPESERVE_KV_CACHE_GIB": os.environ.get("ROPESERVE_TEST_KV_CACHE_GIB", "1")}
    with ThreadPoolExecutor(2) as pool:
        starting = [
            pool.submit(start_server, logs, env | {"VLLM_CPU_OMP_THREADS_BIND": str(k)}, f"replica{k}")
            for k in range(2)
        ]
    replicas = [s.result() for s in starting if s.exception() is None]
    try:
        failed = [error for s in starting if (error := s.exception()) is not None]
        if failed:
            raise failed[0]
        for replica in replicas:  # the strategy's first use on each replica, outside the timings
            body = {"inputs": "Hello", "strategy": YARN, "parameters": {"max_new_tokens": 2}}
            assert httpx.post(f"{replica.url}/generate", json=body, timeout=300).status_code == 200
        with vllm_router([r.url for r in replicas], Path(logs)) as router:
            yield Fleet(router, replicas)
    finally:
        for replica in replicas:
            stop_server(replica)


def _ask(client: RopeserveClient, question: str) -> tuple[float, Any]:
    """Time to first token of a streamed question on DOCUMENT, and the last event."""
    started = time.perf_counter()
    first = None
    last = None
    for event in client.generate_stream(question, context=DOCUMENT, strategy=YARN, max_new_tokens=8):
        first = first if first is not None else time.perf_counter() - started
        last = event
    assert first is not None and last is not None
    return first, last


def _prefix_cache_hits(url: str) -> float:
    """Prompt tokens the replica's prefix cache served (`ropeserve_prefix_cache_hits_total`)."""
    return sample_value(httpx.get(f"{url}/metrics", timeout=60).text, "ropeserve_prefix_cache_hits_total")


def _prefix_cache_hits_since(urls: list[str], before: list[float]) -> list[float]:
    """Each replica's hits since `before`, once some show: the engine's stats of a finished row reach
    the metrics just after its last token reaches the client."""
    deadline = time.monotonic() + 10
    while True:
        hits = [_prefix_cache_hits(url) - b for url, b in zip(urls, before, strict=True)]
        if any(hits) or time.monotonic() > deadline:
            return hits
        time.sleep(0.2)


def test_second_question_on_a_document_is_served_by_the_replica_that_read_it(fleet: Fleet) -> None:
    with RopeserveClient(fleet.router) as client:
        reader, (first_ttft, first) = fleet.served_by(lambda: _ask(client, QUESTIONS[0]))
        hits_before = [_prefix_cache_hits(url) for url in fleet.urls]
        again, (second_ttft, second) = fleet.served_by(lambda: _ask(client, QUESTIONS[1]))
        hits = _prefix_cache_hits_since(fleet.urls, hits_before)
    assert again == reader
    # The strategy came through the router unchanged (and so did the context: the prompt is long).
    for last in (first, second):
        assert last.strategy is not None and last.strategy["name"] == "yarn" and last.strategy["factor"] == 2.0
        assert last.details is not None and last.details.input_length > 1500
    # The reader's prefix cache served the document (in whole KV blocks: all but the last partial
    # block and the question; measured 1,920 of 2,005 tokens), the other replica's nothing.
    assert hits[reader] > 0.9 * first.details.input_length and hits[1 - reader] == 0, hits
    assert second_ttft < first_ttft / 2, (first_ttft, second_ttft)
    print(f"\nTTFT through the router: first question {first_ttft:.2f} s, second {second_ttft:.2f} s")


def test_preset_strategy_and_context_pass_through_the_openai_routes(fleet: Fleet) -> None:
    models = httpx.get(f"{fleet.router}/v1/models", timeout=60).json()["data"]
    preset = next(m["id"] for m in models if (m.get("strategy") or {}).get("name") == "dca")
    context = report(20, seed=12)
    headers = {ROUTING_HEADER: document_routing_key(context)}
    chat = {"model": preset, "messages": [{"role": "user", "content": "Who is it about?"}], "max_tokens": 4}
    reply = httpx.post(
        f"{fleet.router}/v1/chat/completions", json=chat | {"context": context}, headers=headers, timeout=300
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["model"] == preset and reply.json()["strategy"]["name"] == "dca"
    assert reply.json()["usage"]["prompt_tokens"] > 150  # the context's tokens came too
    completion = {"prompt": "Summary:", "context": context, "strategy": YARN, "max_tokens": 4, "priority": 1}
    reply = httpx.post(f"{fleet.router}/v1/completions", json=completion, headers=headers, timeout=300)
    assert reply.status_code == 200, reply.text
    assert reply.json()["strategy"]["name"] == "yarn" and reply.json()["usage"]["prompt_tokens"] > 150
