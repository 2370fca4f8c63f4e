"""The engine process dies under a mixed load: every request in flight ends (a 503, or an error
event on a stream that had started; none hangs), whatever its strategy or phase; /health says so,
new requests get 503, and the engine is restarted with nothing held. /health sees the death within a
second of it. A real server of its own (the
shared one must keep its single engine start)."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import time
from typing import Any

import httpx
import psutil
import pytest

from tests.conftest import engine_core_processes, start_server, stop_server
from tests.support.documents import report
from tests.support.metrics_text import scrape

pytestmark = [pytest.mark.engine, pytest.mark.default_tier]

LONG = {"max_tokens": 2000, "ignore_eos": True, "temperature": 0}
# About 8,800 tokens: past DCA's first chunk, so the kill finds it in the middle of its prefill.
DCA_DOCUMENT = report(800, seed=7)
# (route, body): the strategies and phases in flight when the engine core is killed.
IN_FLIGHT: dict[str, tuple[str, dict[str, Any]]] = {
    "yarn decoding": ("/v1/completions", {"prompt": "Once upon a time", "strategy": {"name": "yarn", "factor": 2}}),
    "dca prefilling, streamed": (
        "/v1/completions",
        {
            "prompt": "Which entry mentions the sealed letter?",
            "context": DCA_DOCUMENT,
            "strategy": "dca",
            "stream": True,
        },
    ),
    "nbce rows": (
        "/v1/completions",
        {
            "prompt": "Summarise.",
            "context": ["The ship left at dawn.", "The crew sang.", "A gull followed."],
            "strategy": "nbce",
        },
    ),
    "rerope streamed": (
        "/v1/completions",
        {"prompt": "The harbour at night", "strategy": {"name": "rerope", "window": 128}, "stream": True},
    ),
    "native chat streamed": (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "Tell a long story."}], "stream": True},
    ),
}
STRATEGIES = ("yarn", "dca", "nbce", "rerope", "native")


def engine_core(server_pid: int) -> psutil.Process:
    cores = engine_core_processes(server_pid)
    assert len(cores) == 1, cores
    return cores[0]


def outcome(http: httpx.Client, route: str, body: dict[str, Any]) -> tuple[int, str, dict[str, Any] | None]:
    """(status, how it ended, the last stream event or JSON body): "error" when the request ended
    in the engine's 503 or an in-band error event, "done" when it finished."""
    with http.stream("POST", route, json={**LONG, **body}) as reply:
        if not body.get("stream") or reply.status_code != 200:
            reply.read()
            payload = reply.json()
            return reply.status_code, "error" if reply.status_code >= 400 else "done", payload
        events = [line[len("data: ") :] for line in reply.iter_lines() if line.startswith("data: ")]
    last = json.loads(events[-2]) if events and events[-1] == "[DONE]" and len(events) > 1 else None
    if events and events[-1] != "[DONE]":
        last = json.loads(events[-1])
    ended = "error" if last is not None and "error" in last else "done"
    return 200, ended, last


def test_a_killed_engine_ends_every_request_in_flight_and_is_restarted(tmp_path) -> None:
    server = start_server(tmp_path, name="fault")
    try:
        with httpx.Client(base_url=server.url, timeout=300) as http:
            with concurrent.futures.ThreadPoolExecutor(len(IN_FLIGHT)) as pool:
                futures = {name: pool.submit(outcome, http, *request) for name, request in IN_FLIGHT.items()}
                time.sleep(8)
                for strategy in STRATEGIES:
                    assert scrape(http, "ropeserve_requests_in_flight", strategy=strategy) == 1, server.log()[-3000:]
                first_core = engine_core(server.process.pid)
                first_core.send_signal(signal.SIGKILL)
                killed = time.monotonic()
                # /health (what a load balancer or Kubernetes reads) says so within a second: it
                # answered 200 for ~10 s, until vLLM's own monitor flagged the engine dead.
                while http.get("/health/ready").status_code == 200 and time.monotonic() - killed < 10:
                    time.sleep(0.02)
                seen_after = time.monotonic() - killed
                assert seen_after < 1.0, seen_after
                assert http.get("/health/live").status_code == 200  # the process is fine: no restart of the pod
                ended = {name: future.result(timeout=120) for name, future in futures.items()}  # answers, not hangs

            for name, (status, how, last) in ended.items():
                assert how == "error", (name, status, last, server.log()[-3000:])
                if status != 200:
                    assert status == 503 and last is not None, (name, status, last)
                error = last["error"] if isinstance(last, dict) else None
                assert error is not None, (name, last)
            # Non-streamed requests get the status; a stream that had started gets the same error in-band.
            assert ended["nbce rows"][0] == 503 and ended["yarn decoding"][0] == 503, ended

            health = http.get("/health")
            assert health.status_code == 503 and health.json()["error_type"] == "generation", health.text
            refused = http.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}})
            assert refused.status_code == 503, (refused.text, server.log()[-3000:])

            deadline = time.monotonic() + 600
            while time.monotonic() < deadline and http.get("/health").status_code != 200:
                time.sleep(1)
            assert http.get("/health").status_code == 200, server.log()[-3000:]
            assert engine_core(server.process.pid).pid != first_core.pid
            assert scrape(http, "ropeserve_engine_starts_total", engine="vllm") == 2
            # Nothing of the killed requests is held by the new engine or counted as in flight.
            assert scrape(http, "ropeserve_kv_cache_usage_ratio", engine="vllm") == 0
            for strategy in STRATEGIES:
                assert scrape(http, "ropeserve_requests_in_flight", strategy=strategy) == 0, strategy

            # Each strategy runs again on the new engine (dca over a short context: its long prefill
            # was what the kill had to interrupt, and a second one would show nothing more).
            for name, (route, body) in IN_FLIGHT.items():
                short = {"context": "The letter was sealed."} if body.get("context") == DCA_DOCUMENT else {}
                again = http.post(route, json={**body, **short, "max_tokens": 2, "stream": False})
                assert again.status_code == 200, (name, again.text)
    finally:
        stop_server(server)
