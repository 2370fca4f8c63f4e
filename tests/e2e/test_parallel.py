"""Tensor parallelism on this CPU host: `ROPESERVE_TENSOR_PARALLEL_SIZE=2` (two vLLM ranks, one
core each, the `mp` backend) serves every strategy with the single-rank server's greedy tokens.

SmolLM2-135M's 9 query / 3 KV heads do not split in two; the server serves it padded with zero
heads (server/ops/head_padding.py), which computes the same function. The ranks sum their partial
results in another order than one rank does, so logprobs differ by rounding: measured under 3e-5
in float32; the test allows 1e-3 and asks for identical tokens.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from clients.bench_scaling import haproxy
from tests.conftest import RunningServer, start_server, stop_server
from tests.support.documents import report
from tests.support.metrics_text import scrape


def _two_ranks_fit() -> bool:
    """Two cores on the CPU build (one per rank), two GPUs on a GPU build."""
    from server.engines.vllm_engine import is_cpu_build

    if is_cpu_build():
        return len(os.sched_getaffinity(0)) >= 2
    import torch

    return bool(torch.cuda.device_count() >= 2)


pytestmark = [
    pytest.mark.engine,
    pytest.mark.default_tier,
    pytest.mark.skipif(not _two_ranks_fit(), reason="tensor parallel 2 needs two cores (CPU build) or two GPUs"),
]

LOGPROB_TOLERANCE = 1e-3
# ~3k tokens: past nothing's window, but every strategy's rotation differs.
DOCUMENT = report(280, seed=7)
STRATEGIES: list[Any] = [
    "native",
    {"name": "linear", "factor": 2},
    {"name": "ntk", "factor": 2},
    "dynamic_ntk",
    {"name": "yarn", "factor": 2},
    {"name": "llama3", "factor": 2},
    {"name": "nbce", "chunk_tokens": 1024},
    "auto",
]


@pytest.fixture(scope="module")
def tp2_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = start_server(tmp_path_factory.mktemp("tp2"), {"ROPESERVE_TENSOR_PARALLEL_SIZE": "2"}, name="tp2")
    yield running
    stop_server(running)


_single_rank_answers: dict[str, dict[str, Any]] = {}


def _single_rank_answer(base_url: str, strategy: Any) -> dict[str, Any]:
    """The session server's (one rank) answer, asked once per strategy in this module."""
    key = json.dumps(strategy, sort_keys=True)
    if key not in _single_rank_answers:
        _single_rank_answers[key] = _answer(base_url, strategy)
    return _single_rank_answers[key]


def _assert_same_answer(one: dict[str, Any], two: dict[str, Any]) -> None:
    assert one["strategy"] == two["strategy"]
    tokens_one = [t["id"] for t in one["details"]["tokens"]]
    tokens_two = [t["id"] for t in two["details"]["tokens"]]
    assert tokens_one == tokens_two and len(tokens_one) >= 8  # 16, or an end of sequence after 8 or more
    if one["strategy"]["name"] == "nbce":
        return  # NBCE's combined tokens carry no logprobs
    for a, b in zip(one["details"]["tokens"], two["details"]["tokens"], strict=True):
        assert abs(a["logprob"] - b["logprob"]) < LOGPROB_TOLERANCE, (a, b)


def _answer(url: str, strategy: Any) -> dict[str, Any]:
    body = {
        "inputs": "Question: what did the night clerk inspect?\nAnswer:",
        "context": DOCUMENT,
        "parameters": {"max_new_tokens": 16, "details": True},
        "strategy": strategy,
    }
    reply = httpx.post(f"{url}/generate", json=body, timeout=600)
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_tp2_reports_its_ranks_in_info_and_metrics(tp2_server: RunningServer) -> None:
    with httpx.Client(base_url=tp2_server.url, timeout=60) as client:
        info = client.get("/info").json()
        assert info["parallelism"] == {
            "tensor_parallel_size": 2,
            "pipeline_parallel_size": 1,
            "data_parallel_size": 1,
            "distributed_executor_backend": "mp",
            "ranks": 2,
        }
        assert scrape(client, "ropeserve_engine_ranks", tensor_parallel_size="2", engine="vllm") == 2
    log = tp2_server.log()
    assert "padded with zero heads" in log
    assert "world_size=2" in log  # vLLM's own account of the ranks it started


def _strategy_id(strategy: Any) -> str:
    return strategy if isinstance(strategy, str) else strategy["name"]


# The default tier: the one-rank answer of a plain row, a RoPE-scaled one, dynamic_ntk's own base,
# NBCE's rows and auto; the long tier adds the other scalings.
DEFAULT_TIER = ("native", "dynamic_ntk", "yarn", "nbce", "auto")


@pytest.mark.parametrize(
    "strategy",
    [
        pytest.param(s, id=_strategy_id(s), marks=() if _strategy_id(s) in DEFAULT_TIER else pytest.mark.long_tier)
        for s in STRATEGIES
    ],
)
def test_tp2_serves_the_single_rank_greedy_tokens(strategy: Any, tp2_server: RunningServer, base_url: str) -> None:
    _assert_same_answer(_single_rank_answer(base_url, strategy), _answer(tp2_server.url, strategy))


@pytest.mark.long_tier
def test_tp2_on_the_ray_backend_serves_every_strategy_and_leaves_no_ray_behind(base_url: str, tmp_path: Path) -> None:
    """vLLM's Ray executor on a local Ray instance the server starts (server/engines/cpu_ray.py)."""
    env = {"ROPESERVE_TENSOR_PARALLEL_SIZE": "2", "ROPESERVE_DISTRIBUTED_EXECUTOR_BACKEND": "ray"}
    server = start_server(tmp_path, env, name="ray")
    try:
        info = httpx.get(f"{server.url}/info", timeout=30).json()
        assert info["parallelism"]["distributed_executor_backend"] == "ray"
        from server.engines.vllm_engine import is_cpu_build

        if is_cpu_build():
            assert "Platform plugin ropeserve_cpu_ray is activated" in server.log()
        for strategy in STRATEGIES:
            _assert_same_answer(_single_rank_answer(base_url, strategy), _answer(server.url, strategy))
    finally:
        code = stop_server(server, timeout=120)
    assert code == 0, server.log()[-3000:]
    leftovers = [p for p in psutil.process_iter(["cmdline"]) if " ".join(p.info["cmdline"] or []).startswith("ray::")]
    assert not leftovers, [p.info["cmdline"] for p in leftovers]


@pytest.mark.long_tier
def test_two_replicas_behind_haproxy_serve_any_strategy(
    tp2_server: RunningServer, base_url: str, tmp_path: Path
) -> None:
    """Any replica serves any strategy: round-robin over two servers (one of them TP=2), every
    request answered the same whichever replica took it."""
    strategies = ["native", {"name": "yarn", "factor": 2}, "dynamic_ntk", {"name": "nbce", "chunk_tokens": 1024}]
    served_before = [_requests_served(url) for url in (base_url, tp2_server.url)]
    with haproxy([base_url, tp2_server.url], tmp_path) as url:
        for strategy in strategies * 2:  # each strategy reaches each replica once
            answers = {_answer(url, strategy)["generated_text"] for _ in range(2)}
            assert len(answers) == 1, (strategy, answers)
    served = [
        _requests_served(url) - before for url, before in zip((base_url, tp2_server.url), served_before, strict=True)
    ]
    assert served == [8, 8], served


def _requests_served(url: str) -> float:
    with httpx.Client(base_url=url, timeout=60) as client:
        return scrape(client, "ropeserve_requests_total", status="success")
