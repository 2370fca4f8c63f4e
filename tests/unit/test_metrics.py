"""The metrics room without an engine: vLLM's stats reach the right series, labels stay bounded,
and promtool accepts the exposition. (The real server's /metrics: tests/e2e/test_monitoring.py.)"""

from __future__ import annotations

import logging
import subprocess

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from server.engines.base import EngineIteration, EngineStats, FinishedRow, Parallelism
from server.ops.metrics import Metrics
from server.plan import ModelFacts
from tests.support.prometheus_fixture import find_tool


class FakeEngine:  # hashable, like VllmEngine
    kind = "vllm"
    MODEL = ModelFacts("m", 2048, {"rope_theta": 10000.0}, 64, 1000)

    def __init__(
        self, startup_seconds: float = 3.0, slot_loads: int = 0, parallelism: Parallelism | None = None
    ) -> None:
        self.startup_seconds = startup_seconds
        self.slot_loads = slot_loads
        self.parallelism = parallelism or Parallelism()

    def stats(self) -> EngineStats:
        return EngineStats(0.25, 2, 1, rope_slots_in_use=3, rope_slots=31, rope_slot_loads=self.slot_loads)


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return samples(metrics).get((name, tuple(sorted(labels.items()))))


def test_vllm_stats_reach_engine_gauges_and_strategy_histograms() -> None:
    m = Metrics(gpu=False)
    engine = FakeEngine()
    m.init_strategies(["native", "nbce"])
    job_a, job_b = "a" * 32, "b" * 32
    m.track_request(job_a, "native")
    m.track_request(job_b, "nbce")
    iteration = EngineIteration(
        kv_cache_usage=0.4,
        running_requests=3,
        waiting_requests=2,
        preempted_rows=2,
        finished=(
            FinishedRow(job_a, 0.5, 0.25),
            FinishedRow(f"{job_b}-row1", 1.0, 0.1),  # NBCE rows extend their request's id
            FinishedRow(f"{job_b}-row2", 2.0, 0.1),
            FinishedRow("c" * 32, 9.0, 9.0),  # not ours: ignored, not labelled "unknown"
        ),
    )
    m.engine_listener(engine, iteration)

    assert value(m, "ropeserve_kv_cache_usage_ratio", engine="vllm") == 0.4
    assert value(m, "ropeserve_requests_running", engine="vllm") == 3
    assert value(m, "ropeserve_requests_queued", engine="vllm") == 2
    assert value(m, "ropeserve_engine_preemptions_total", engine="vllm") == 2
    assert value(m, "ropeserve_request_queue_time_seconds_count", strategy="native") == 1
    assert value(m, "ropeserve_request_queue_time_seconds_sum", strategy="native") == 0.5
    assert value(m, "ropeserve_request_queue_time_seconds_count", strategy="nbce") == 2
    assert value(m, "ropeserve_request_queue_time_seconds_sum", strategy="nbce") == 3.0
    assert value(m, "ropeserve_request_prefill_time_seconds_sum", strategy="native") == 0.25
    strategies = {dict(labels).get("strategy") for (_, labels) in samples(m)} - {None}
    assert strategies == {"native", "nbce"}


def test_engine_gauges_at_scrape_time_and_one_start() -> None:
    m = Metrics(gpu=False)
    engine = FakeEngine(slot_loads=4)
    m.refresh_engine(engine)
    assert value(m, "ropeserve_engines") == 1
    assert value(m, "ropeserve_kv_cache_usage_ratio", engine="vllm") == 0.25
    assert value(m, "ropeserve_engine_startup_seconds", engine="vllm") == 3.0
    assert value(m, "ropeserve_rope_slots", engine="vllm") == 31
    assert value(m, "ropeserve_rope_slots_in_use", engine="vllm") == 3
    assert value(m, "ropeserve_rope_slot_loads_total", engine="vllm") == 4
    engine.slot_loads = 6
    m.refresh_engine(engine)  # a scrape later: the engine is not counted as started again
    assert value(m, "ropeserve_engine_starts_total", engine="vllm") == 1
    assert value(m, "ropeserve_rope_slot_loads_total", engine="vllm") == 6


def test_the_engines_parallel_settings_are_labels_of_its_rank_count() -> None:
    m = Metrics(gpu=False)
    m.refresh_engine(FakeEngine(parallelism=Parallelism(tensor=2, pipeline=1, data=3, backend="ray")))
    labels = {
        "engine": "vllm",
        "tensor_parallel_size": "2",
        "pipeline_parallel_size": "1",
        "data_parallel_size": "3",
        "distributed_executor_backend": "ray",
    }
    assert value(m, "ropeserve_engine_ranks", **labels) == 6
    m.refresh_engine(FakeEngine())  # a restarted engine with other settings: one series, the new one
    assert value(m, "ropeserve_engine_ranks", **labels) is None
    assert (
        value(
            m,
            "ropeserve_engine_ranks",
            **(labels | {"tensor_parallel_size": "1", "data_parallel_size": "1", "distributed_executor_backend": "mp"}),
        )
        == 1
    )


def test_strategies_are_exported_at_zero_before_traffic() -> None:
    m = Metrics(gpu=False)
    m.init_strategies(["native", "yarn"])
    for strategy in ("native", "yarn"):
        assert value(m, "ropeserve_time_to_first_token_seconds_count", strategy=strategy) == 0
        assert value(m, "ropeserve_requests_total", strategy=strategy, status="success") == 0
        assert value(m, "ropeserve_requests_total", strategy=strategy, status="error") == 0


def test_an_iteration_without_scheduler_figures_keeps_the_gauges() -> None:
    m = Metrics(gpu=False)
    engine = FakeEngine()
    m.engine_listener(engine, EngineIteration(kv_cache_usage=0.3, running_requests=1, waiting_requests=0))
    m.engine_listener(engine, EngineIteration(preempted_rows=1))
    assert value(m, "ropeserve_kv_cache_usage_ratio", engine="vllm") == 0.3
    assert value(m, "ropeserve_engine_preemptions_total", engine="vllm") == 1


def test_a_failing_listener_is_logged_not_raised_into_vllm(caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("vllm")
    from server.engines.vllm_engine import VllmEngine, VllmEngineConfig

    def broken(engine: object, iteration: EngineIteration) -> None:
        raise RuntimeError("listener bug")

    engine = VllmEngine(VllmEngineConfig(model="unused", max_model_len=4096), FakeEngine.MODEL, stats_listener=broken)
    with caplog.at_level(logging.ERROR):
        engine.record_iteration(EngineIteration(kv_cache_usage=0.7, running_requests=1, waiting_requests=0))
    assert "listener failed" in caplog.text and "listener bug" in caplog.text
    assert engine.stats().kv_cache_usage == 0.7


def test_gpu_memory_is_absent_without_a_gpu() -> None:
    names = {name for (name, _) in samples(Metrics(gpu=False))}
    assert not any(n.startswith("ropeserve_gpu_") for n in names)
    assert "process_resident_memory_bytes" in names


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


@pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA GPU (run on the GPU host; docs/scaling.md)")
def test_gpu_memory_gauges_follow_the_device() -> None:
    import torch

    m = Metrics()  # the default: GPU gauges when a GPU is there
    before = value(m, "ropeserve_gpu_memory_used_bytes", gpu="0")
    free, total = torch.cuda.mem_get_info(0)
    # NVML counts the memory the driver reserves, CUDA's mem_get_info does not (~0.5 % on an H200).
    assert abs(value(m, "ropeserve_gpu_memory_total_bytes", gpu="0") - total) < 0.01 * total
    assert before is not None and abs(before - (total - free)) < 0.01 * total
    block = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda:0")
    torch.cuda.synchronize()
    grown = value(m, "ropeserve_gpu_memory_used_bytes", gpu="0")
    assert grown is not None and grown - before >= 500 * 2**20, (before, grown)
    del block


def test_promtool_accepts_the_exposition_with_every_series() -> None:
    m = Metrics(gpu=False)
    m.init_strategies(["native", "ntk"])
    engine = FakeEngine()
    m.refresh_engine(engine)
    m.track_request("d" * 32, "native")
    m.engine_listener(engine, EngineIteration(0.1, 1, 0, 1, (FinishedRow("d" * 32, 0.1, 0.2),)))
    m.time_to_first_token.labels("native").observe(0.3)
    text = generate_latest(m.registry).decode()
    assert ":" not in "".join(
        line.split("{")[0].split(" ")[0] for line in text.splitlines() if not line.startswith("#")
    )
    result = subprocess.run([find_tool("promtool"), "check", "metrics"], input=text, capture_output=True, text=True)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
