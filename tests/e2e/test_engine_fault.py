"""The engine process dies: /health says so, requests get 503 (not a hang), and the engine is
restarted (real server of its own; the shared one must keep its single engine start)."""

from __future__ import annotations

import concurrent.futures
import signal
import time

import httpx
import psutil
import pytest

from tests.conftest import engine_core_processes, start_server, stop_server
from tests.support.metrics_text import scrape

pytestmark = [pytest.mark.engine, pytest.mark.default_tier]


def engine_core(server_pid: int) -> psutil.Process:
    cores = engine_core_processes(server_pid)
    assert len(cores) == 1, cores
    return cores[0]


def test_a_killed_engine_gives_503s_and_is_restarted(tmp_path) -> None:
    server = start_server(tmp_path, name="fault")
    try:
        with httpx.Client(base_url=server.url, timeout=300) as http:
            body = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 2000, "do_sample": False}}
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                in_flight = pool.submit(
                    http.post, "/generate", json={**body, "strategy": {"name": "yarn", "factor": 2}}
                )
                time.sleep(3)
                first_core = engine_core(server.process.pid)
                first_core.send_signal(signal.SIGKILL)
                reply = in_flight.result(timeout=60)  # an answer, not a hang
            assert reply.status_code == 503, (reply.text, server.log()[-3000:])
            assert reply.json()["error_type"] == "generation"

            health = http.get("/health")
            assert health.status_code == 503 and health.json()["error_type"] == "generation", health.text
            refused = http.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}})
            assert refused.status_code == 503, (refused.text, server.log()[-3000:])

            deadline = time.monotonic() + 600
            while time.monotonic() < deadline and http.get("/health").status_code != 200:
                time.sleep(1)
            assert http.get("/health").status_code == 200, server.log()[-3000:]
            ok = http.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}})
            assert ok.status_code == 200, ok.text
            assert engine_core(server.process.pid).pid != first_core.pid
            assert scrape(http, "ropeserve_engine_starts_total", engine="vllm") == 2
    finally:
        stop_server(server)
