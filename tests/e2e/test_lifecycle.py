"""Concurrency, client disconnects and clean shutdown of the real server."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.conftest import process_group_alive, start_server, stop_server
from tests.support.metrics_text import scrape
from tests.support.sse import parse_sse

pytestmark = [pytest.mark.engine, pytest.mark.default_tier]

LONG = {"prompt": "Once upon a time", "max_tokens": 3000, "temperature": 0, "ignore_eos": True}


def _wait_for(predicate, timeout: float = 60.0, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def test_concurrent_requests_are_in_flight_together(base_url, http):
    """Four clients at once are all being served at once: the server does not serialize them."""

    async def one(client: httpx.AsyncClient, i: int) -> int:
        body = {"inputs": f"Story {i}: once upon a time", "parameters": {"max_new_tokens": 40}}
        return (await client.post("/generate", json=body)).status_code

    peak = 0

    async def watch(stop: asyncio.Event, client: httpx.AsyncClient) -> None:
        nonlocal peak
        while not stop.is_set():
            text = (await client.get("/metrics")).text
            from tests.support.metrics_text import sample_value

            peak = max(peak, int(sample_value(text, "ropeserve_requests_in_flight")))
            await asyncio.sleep(0.05)

    async def main() -> list[int]:
        async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:
            stop = asyncio.Event()
            watcher = asyncio.create_task(watch(stop, client))
            codes = await asyncio.gather(*(one(client, i) for i in range(4)))
            stop.set()
            await watcher
            return list(codes)

    assert asyncio.run(main()) == [200] * 4
    assert peak >= 2, f"at most {peak} request(s) were in flight together"


def test_streaming_client_disconnect_aborts_engine_request(base_url, http):
    cancelled_before = scrape(http, "ropeserve_requests_total", status="cancelled")
    with (
        httpx.Client(base_url=base_url, timeout=60) as client,
        client.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as reply,
    ):
        assert reply.status_code == 200
        lines = reply.iter_lines()
        got = [next(lines) for _ in range(3)]
        assert any(line.startswith("data: ") for line in got)
    # 3000 forced tokens would take minutes here; an aborted request ends at once.
    assert _wait_for(lambda: scrape(http, "ropeserve_requests_in_flight") == 0, timeout=30)
    assert scrape(http, "ropeserve_requests_total", status="cancelled") == cancelled_before + 1


def test_non_streaming_client_disconnect_aborts_engine_request(base_url, http):
    cancelled_before = scrape(http, "ropeserve_requests_total", status="cancelled")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base_url}/v1/completions", json=LONG, timeout=3)
    assert _wait_for(lambda: scrape(http, "ropeserve_requests_in_flight") == 0, timeout=30)
    assert scrape(http, "ropeserve_requests_total", status="cancelled") == cancelled_before + 1


def test_a_client_leaving_mid_prefill_frees_the_row_within_a_step(base_url, http):
    """The client of a long prompt leaves before its first token: the row is aborted mid-prefill
    (vLLM aborts between steps of the chunked prefill), not after the whole prompt is read."""
    import uuid

    text = uuid.uuid4().hex + " " + "The quick brown fox jumps over the lazy dog. " * 1300  # ~12k tokens
    body = {"inputs": text, "strategy": "dynamic_ntk", "parameters": {"max_new_tokens": 8}}
    with (
        httpx.Client(base_url=base_url, timeout=60) as client,
        client.stream("POST", "/generate_stream", json=body) as reply,
    ):
        assert reply.status_code == 200
        time.sleep(2)  # mid-prefill: ~12k tokens take tens of seconds here
    assert _wait_for(lambda: scrape(http, "ropeserve_requests_in_flight") == 0, timeout=30)
    # When a short request after it is done, vLLM's scheduler runs nothing: the long row is gone
    # (its prefill alone would have taken longer than this).
    assert http.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}}).status_code == 200
    assert scrape(http, "ropeserve_requests_running", engine="vllm") == 0


@pytest.mark.parametrize(
    "sig",
    # SIGTERM's exit 0 with no engine left is also checked by the drain test below.
    [pytest.param(signal.SIGINT, id="ctrl-c"), pytest.param(signal.SIGTERM, id="sigterm", marks=pytest.mark.long_tier)],
)
def test_shutdown_leaves_no_engine_processes(tmp_path, sig):
    server = start_server(tmp_path, name=f"shutdown-{sig.name}")
    pgid = os.getpgid(server.process.pid)
    children = _children(server.process.pid)
    assert children, "vLLM runs its engine core in child processes"
    reply = httpx.post(
        f"{server.url}/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}}, timeout=120
    )
    assert reply.status_code == 200
    code = stop_server(server, sig=sig, timeout=60)
    assert code == 0, server.log()[-3000:]
    assert _wait_for(lambda: not process_group_alive(pgid), timeout=20), "engine processes outlived the server"
    assert not [pid for pid in children if _alive(pid)]


def test_sigterm_drains_a_stream_in_flight_then_exits_0(tmp_path):
    """Kubernetes' termination: SIGTERM mid-stream; the stream finishes within the grace period,
    readiness and new requests get 503 meanwhile, the process exits 0 and leaves no engine behind."""
    server = start_server(tmp_path, {"ROPESERVE_DRAIN_TIMEOUT_S": "120"}, name="drain")
    pgid = os.getpgid(server.process.pid)
    # ~3k tokens of prompt: a prefill of seconds, so the stream is surely in flight at SIGTERM.
    body = {
        "inputs": uuid.uuid4().hex + " " + "The quick brown fox jumps over the lazy dog. " * 300,
        "parameters": {"max_new_tokens": 48, "details": True},
    }
    events: list = []
    with httpx.Client(base_url=server.url, timeout=300) as client:
        with client.stream("POST", "/generate_stream", json=body) as reply:
            assert reply.status_code == 200
            server.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            assert _wait_for(lambda: client.get("/health").status_code == 503, timeout=10), server.log()[-3000:]
            refused = client.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}})
            assert refused.status_code == 503
            assert refused.json()["error_type"] == "generation" and "shutting down" in refused.json()["error"]
            assert server.process.poll() is None  # still serving the stream
            events = parse_sse(reply.read().decode())
        drained_in = time.monotonic() - signalled
    final = events[-1]
    assert final["details"]["finish_reason"] == "length" and final["details"]["generated_tokens"] == 48
    assert len([e for e in events if e.get("token")]) == 48
    assert server.process.wait(timeout=60) == 0, server.log()[-3000:]
    assert _wait_for(lambda: not process_group_alive(pgid), timeout=20), "engine processes outlived the server"
    log = server.log()
    assert "draining: 1 requests in flight" in log and "drained in" in log, log[-3000:]
    print(f"\nSIGTERM to drained: {drained_in:.1f} s")


def _alive(pid: int) -> bool:
    """Running, not a zombie: a container's PID 1 may never reap the orphans' exit status."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _children(pid: int) -> list[int]:
    """All descendants of `pid` (children of any of its threads)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        kids = [child for child, ppid in parents.items() if ppid == parent]
        found.extend(kids)
        frontier.extend(kids)
    return found
