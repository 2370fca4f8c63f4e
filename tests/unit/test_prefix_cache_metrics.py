"""Prefix-cache queries and hits per strategy, without an engine: vLLM's per-row stats reach
`ropeserve_prefix_cache_{queries,hits}_total`, and the dashboard shows them. (On the real engine:
tests/e2e/test_monitoring.py, a second question on the same document.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from server.engines.base import EngineIteration, FinishedRow
from server.ops.metrics import Metrics
from server.plan import ModelFacts

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "ropeserve-dashboard.json"
QUERIES, HITS = "ropeserve_prefix_cache_queries_total", "ropeserve_prefix_cache_hits_total"


class StubEngine:  # hashable, like VllmEngine
    kind = "vllm"


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    text = generate_latest(metrics.registry).decode()
    found = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    return found.get((name, tuple(sorted(labels.items()))))


def test_every_strategy_is_exported_at_zero() -> None:
    m = Metrics(gpu=False)
    m.init_strategies(["native", "dca"])
    for strategy in ("native", "dca"):
        assert value(m, QUERIES, strategy=strategy) == 0
        assert value(m, HITS, strategy=strategy) == 0


def test_finished_rows_count_their_prompt_and_cached_tokens_under_their_strategy() -> None:
    m = Metrics(gpu=False)
    m.init_strategies(["yarn", "nbce"])
    first, second, nbce = "a" * 32, "b" * 32, "c" * 32
    for request_id, strategy in ((first, "yarn"), (second, "yarn"), (nbce, "nbce")):
        m.track_request(request_id, strategy)
    rows = (
        FinishedRow(first, 0.1, 2.0, prompt_tokens=1500, cached_tokens=0),  # a fresh document
        FinishedRow(second, 0.1, 0.2, prompt_tokens=1510, cached_tokens=1408),  # the same, asked again
        FinishedRow(f"{nbce}:prefill:1", 0.1, 0.5, prompt_tokens=900, cached_tokens=0),  # NBCE's rows
        FinishedRow(f"{nbce}:0:1", 0.1, 0.1, prompt_tokens=900, cached_tokens=896),
        FinishedRow("d" * 32, 0.1, 0.1, prompt_tokens=50, cached_tokens=50),  # not ours: not counted
    )
    m.engine_listener(StubEngine(), EngineIteration(finished=rows))
    assert value(m, QUERIES, strategy="yarn") == 3010
    assert value(m, HITS, strategy="yarn") == 1408
    assert value(m, QUERIES, strategy="nbce") == 1800
    assert value(m, HITS, strategy="nbce") == 896
    assert value(m, QUERIES, strategy="unknown") is None


def test_rows_without_cache_figures_count_nothing() -> None:
    m = Metrics(gpu=False)
    m.track_request("e" * 32, "native")
    m.engine_listener(StubEngine(), EngineIteration(finished=(FinishedRow("e" * 32, 0.1, 0.2),)))
    assert value(m, QUERIES, strategy="native") == 0
    assert value(m, HITS, strategy="native") == 0
    assert value(m, "ropeserve_request_queue_time_seconds_count", strategy="native") == 1


def test_vllms_finished_request_stats_reach_the_counters_through_the_engines_stat_logger() -> None:
    """The whole path an engine row's figures take: vLLM's stat logger (the class the engine hands
    `AsyncLLM`), `iteration_from_vllm`, the engine's stats listener, the metrics room."""
    pytest.importorskip("vllm")
    from vllm.v1.engine import FinishReason
    from vllm.v1.metrics.stats import IterationStats, RequestStateStats

    from server.engines.vllm_engine import VllmEngine, VllmEngineConfig

    m = Metrics(gpu=False)
    model = ModelFacts("m", 2048, {"rope_theta": 10000.0}, 64, 1000)
    engine = VllmEngine(VllmEngineConfig(model="unused", max_model_len=4096), model, stats_listener=m.engine_listener)
    m.track_request("f" * 32, "dca")
    iteration = IterationStats()
    iteration.update_from_finished_request(
        FinishReason.LENGTH,
        "f" * 32,
        num_prompt_tokens=1600,
        max_tokens_param=None,
        req_stats=RequestStateStats(),
        num_cached_tokens=1536,
    )
    logger = engine.iterations.vllm_logger()(vllm_config=None)
    logger.record(None, iteration)
    assert value(m, QUERIES, strategy="dca") == 1600
    assert value(m, HITS, strategy="dca") == 1536


def test_the_dashboard_shows_prefix_cache_hits_per_strategy_with_exported_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if "prefix-cache" in p["title"].lower()]
    assert panels, "no prefix-cache panel"
    exprs = " ".join(t["expr"] for p in panels for t in p["targets"])
    assert {QUERIES, HITS} <= set(re.findall(r"\bropeserve_[a-z_]+", exprs))
    assert "sum by (strategy)" in exprs
    m = Metrics(gpu=False)
    m.init_strategies(["native"])
    exported = {line.split("{")[0] for line in generate_latest(m.registry).decode().splitlines()}
    assert {QUERIES, HITS} <= exported
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    # Panels do not overlap: each (x, y) cell of the 24-column grid belongs to one panel at most.
    cells = [
        (x, y)
        for p in dashboard["panels"]
        for x in range(p["gridPos"]["x"], p["gridPos"]["x"] + p["gridPos"]["w"])
        for y in range(p["gridPos"]["y"], p["gridPos"]["y"] + p["gridPos"]["h"])
    ]
    assert len(cells) == len(set(cells))
