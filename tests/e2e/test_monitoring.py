"""Observability end to end (issue 3): /metrics after real traffic (promtool-clean, CONTRACT.md's
names, values that add up), the JSON access log, a real Prometheus scraping the real server with
the shipped config and rules, and the Grafana dashboard's queries evaluated against it; plus the
deploy/ files themselves."""

from __future__ import annotations

import json
import re
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import RunningServer

# The `prometheus` fixture comes from tests/support/prometheus_fixture.py (conftest's pytest_plugins).
from tests.support.prometheus_fixture import DEPLOY_PROMETHEUS, PrometheusServer, find_tool, is_number

pytestmark = pytest.mark.default_tier

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "ropeserve-dashboard.json"
TIMEOUT = 600
# Second strategies for the two-strategy checks (all served by the one engine).
SECOND_STRATEGIES = ("ntk", "linear", "yarn", "dynamic_ntk", "llama3")
TTFT_MEDIAN = "histogram_quantile(0.5, sum by (le, strategy) (rate(ropeserve_time_to_first_token_seconds_bucket[1m])))"
# Metrics that exist only on some hosts.
GPU_ONLY = {"ropeserve_gpu_memory_used_bytes", "ropeserve_gpu_memory_total_bytes"}


def prompt(question: str) -> str:
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def generate(url: str, question: str, strategy: Any = "native", max_new_tokens: int = 8, **params: Any) -> dict:
    body = {
        "inputs": prompt(question),
        "parameters": {"max_new_tokens": max_new_tokens, "details": True, **params},
        "strategy": strategy,
    }
    deadline = time.monotonic() + TIMEOUT
    while True:
        reply = httpx.post(f"{url}/generate", json=body, timeout=TIMEOUT)
        # Every RoPE slot may be held by other tests' requests for a moment.
        if reply.status_code == 429 and time.monotonic() < deadline:
            time.sleep(2)
            continue
        assert reply.status_code == 200, reply.text
        return reply.json()


def exposition(url: str) -> str:
    reply = httpx.get(f"{url}/metrics", timeout=30)
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/plain")
    return reply.text


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text_or_samples: str | dict, name: str, **labels: str) -> float:
    found = samples(text_or_samples) if isinstance(text_or_samples, str) else text_or_samples
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def family_names(text: str) -> set[str]:
    """Every metric name the exposition declares (`# TYPE` lines, plus the sample names)."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            names.add(line.split()[2])
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def promtool_check(text: str) -> str:
    result = subprocess.run([find_tool("promtool"), "check", "metrics"], input=text, capture_output=True, text=True)
    return f"rc={result.returncode} {result.stdout}{result.stderr}".strip()


def second_strategy(url: str) -> str:
    names = {s["name"] for s in httpx.get(f"{url}/strategies", timeout=30).json()["strategies"]}
    assert "native" in names
    for name in SECOND_STRATEGIES:
        if name in names:
            return name
    pytest.fail(f"no second RoPE strategy registered to compare with native (have: {sorted(names)})")


def access_log_entries(server: RunningServer, since: int = 0) -> list[dict]:
    entries = []
    for line in server.log()[since:].splitlines():
        if line.startswith("{"):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if entry.get("event") == "request":
                entries.append(entry)
    return entries


# --- deploy/ files (no engine) -------------------------------------------------------------------


def test_alert_rules_and_scrape_config_pass_promtool() -> None:
    promtool = find_tool("promtool")
    for args in (
        ["check", "rules", "alerts.yml"],
        ["check", "config", "prometheus.yml"],
        ["test", "rules", "alerts_test.yml"],
    ):
        result = subprocess.run([promtool, *args], cwd=DEPLOY_PROMETHEUS, capture_output=True, text=True)
        assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"
    rules = yaml.safe_load((DEPLOY_PROMETHEUS / "alerts.yml").read_text())["groups"][0]["rules"]
    alerts = {r["alert"]: r["expr"] for r in rules}
    assert "ropeserve_time_to_first_token_seconds_bucket" in alerts["RopeserveSlowFirstToken"]
    assert "strategy" in alerts["RopeserveSlowFirstToken"]
    assert "ropeserve_kv_cache_usage_ratio" in alerts["RopeserveKVCacheNearlyFull"]
    assert "0.9" in alerts["RopeserveKVCacheNearlyFull"]
    assert 'status="error"' in alerts["RopeserveHighErrorRate"]
    assert "up{" in alerts["RopeserveTargetDown"] and "ropeserve_engines" in alerts["RopeserveNoEngine"]


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every panel target, Grafana's variables filled in as Grafana would."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = (
                target["expr"]
                .replace("$__rate_interval", "1m")
                .replace("$__range", "5m")
                .replace('"$job"', '"ropeserve"')
                .replace('"$strategy"', '".*"')
            )
            assert "$" not in expr, f"{panel['title']}: unresolved variable in {expr}"
            queries.append((panel["title"], expr))
    return queries


def test_dashboard_covers_the_issue() -> None:
    titles = " | ".join(title for title, _ in dashboard_queries())
    exprs = " ".join(expr for _, expr in dashboard_queries())
    for metric in (
        "ropeserve_time_to_first_token_seconds_bucket",
        "ropeserve_inter_token_latency_seconds_bucket",
        "ropeserve_request_duration_seconds_bucket",
        "ropeserve_generated_tokens_total",
        "ropeserve_requests_queued",
        "ropeserve_kv_cache_usage_ratio",
        "ropeserve_request_kv_tokens_bucket",
        "process_resident_memory_bytes",
        "ropeserve_engines",
        "ropeserve_admission_estimated_wait_seconds",
        "ropeserve_requests_refused_total",
        "ropeserve_prefix_cache_hits_total",
        "ropeserve_prefix_cache_queries_total",
    ):
        assert metric in exprs, metric
    assert "sum by (le, strategy)" in exprs
    assert titles


# --- the real server --------------------------------------------------------------------------


@pytest.mark.engine
def test_metrics_after_real_traffic_are_promtool_clean_and_add_up(server: RunningServer) -> None:
    url = server.url
    before = samples(exposition(url))
    replies = [generate(url, f"Name a colour. ({uuid.uuid4().hex[:6]})", max_new_tokens=n) for n in (4, 9, 6)]
    bad = httpx.post(f"{url}/generate", json={"inputs": "hi", "strategy": "no-such-strategy-zz9"}, timeout=60)
    assert bad.status_code == 422
    # vLLM's per-row stats (queue time) arrive through the engine's listener: give it a moment.
    deadline = time.monotonic() + 10
    while True:
        text = exposition(url)
        after = samples(text)
        done = value(after, "ropeserve_request_queue_time_seconds_count", strategy="native") - value(
            before, "ropeserve_request_queue_time_seconds_count", strategy="native"
        )
        if done >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.5)

    assert promtool_check(text) == "rc=0"
    names = family_names(text)
    assert not [n for n in names if ":" in n], "metric names with colons (vLLM's own logger?)"
    for required in (
        "ropeserve_time_to_first_token_seconds_bucket",
        "ropeserve_inter_token_latency_seconds_bucket",
        "ropeserve_request_duration_seconds_bucket",
        "ropeserve_requests_total",
        "ropeserve_prompt_tokens_total",
        "ropeserve_generated_tokens_total",
        "ropeserve_kv_cache_usage_ratio",
        "ropeserve_request_kv_tokens_bucket",
        "ropeserve_requests_in_flight",
        "ropeserve_requests_queued",
        "ropeserve_engines",
        "ropeserve_engine_startup_seconds",
        "ropeserve_prefix_cache_queries_total",
        "ropeserve_prefix_cache_hits_total",
        "process_resident_memory_bytes",
    ):
        assert required in names, required
    gpu = False
    try:
        import torch

        gpu = torch.cuda.is_available()
    except ImportError:
        pass
    assert ("ropeserve_gpu_memory_used_bytes" in names) == gpu

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    generated = sum(r["details"]["generated_tokens"] for r in replies)
    prompt_tokens = sum(r["details"]["input_length"] for r in replies)
    assert delta("ropeserve_requests_total", strategy="native", status="success") == 3
    assert delta("ropeserve_time_to_first_token_seconds_count", strategy="native") == 3
    assert delta("ropeserve_request_duration_seconds_count", strategy="native") == 3
    assert delta("ropeserve_request_kv_tokens_count", strategy="native") == 3
    assert delta("ropeserve_request_kv_tokens_sum", strategy="native") == prompt_tokens + generated
    assert delta("ropeserve_generated_tokens_total", strategy="native") == generated
    assert delta("ropeserve_prompt_tokens_total", strategy="native") == prompt_tokens
    assert delta("ropeserve_inter_token_latency_seconds_count", strategy="native") == generated - 3
    assert delta("ropeserve_request_queue_time_seconds_count", strategy="native") == 3
    assert delta("ropeserve_prefix_cache_queries_total", strategy="native") == prompt_tokens
    assert delta("ropeserve_requests_total", strategy="unknown", status="invalid") == 1
    assert "no-such-strategy-zz9" not in text  # client input never becomes a label
    # Durations are real: each request's TTFT is within its duration.
    assert (
        0
        < delta("ropeserve_time_to_first_token_seconds_sum", strategy="native")
        <= delta("ropeserve_request_duration_seconds_sum", strategy="native")
    )
    assert value(after, "ropeserve_engines") >= 1
    assert value(after, "ropeserve_engine_startup_seconds", engine="vllm") > 0
    assert 0 <= value(after, "ropeserve_kv_cache_usage_ratio", engine="vllm") <= 1
    assert value(after, "ropeserve_requests_in_flight", strategy="native") == 0
    assert value(after, "process_resident_memory_bytes") > 50e6
    # The engine core (weights and, on CPU, the KV cache) lives in a child process.
    assert value(after, "ropeserve_engine_processes_resident_memory_bytes") > 100e6


def ask_about(url: str, context: str, question: str, strategy: dict[str, Any]) -> None:
    """One request on `context` (2 greedy tokens), retried while every RoPE slot is held."""
    body = {"inputs": question, "context": context, "parameters": {"max_new_tokens": 2}, "strategy": strategy}
    deadline = time.monotonic() + TIMEOUT
    while (reply := httpx.post(f"{url}/generate", json=body, timeout=TIMEOUT)).status_code == 429:
        assert time.monotonic() < deadline, reply.text
        time.sleep(2)
    assert reply.status_code == 200, reply.text


def prefix_cache(url: str, strategy: str) -> tuple[float, float]:
    """(queries, hits) of `strategy`: prompt tokens looked up in the prefix cache, and found."""
    text = exposition(url)
    return (
        value(text, "ropeserve_prefix_cache_queries_total", strategy=strategy),
        value(text, "ropeserve_prefix_cache_hits_total", strategy=strategy),
    )


def prefix_cache_after(url: str, strategy: str, before: tuple[float, float]) -> tuple[float, float]:
    """`prefix_cache` once the counters took in a finished request (vLLM's per-row stats reach
    them through the engine's listener)."""
    deadline = time.monotonic() + 10
    while (now := prefix_cache(url, strategy))[0] <= before[0] and time.monotonic() < deadline:
        time.sleep(0.2)
    return now


@pytest.mark.engine
@pytest.mark.parametrize(
    "strategy",
    [{"name": "yarn", "factor": 4}, {"name": "dca", "chunk_size": 512, "local_window": 64}],
    ids=["yarn", "dca"],
)
def test_a_second_question_on_the_same_document_is_served_from_the_prefix_cache(
    server: RunningServer, strategy: dict[str, Any]
) -> None:
    """The document comes first in every row, and the row's RoPE configuration (the cache salt)
    does not depend on the question: the second request computes little more than its question.
    (DCA with 448-token chunks, so that the ~1,500-token document runs as DCA, not as native.)"""
    from clients.bench_reuse import FIRST_QUESTION, SECOND_QUESTION, make_reuse_case

    case = make_reuse_case(1500, seed=uuid.uuid4().int % 10**6, index=0, count=None)  # a fresh document
    name = strategy["name"]
    start = prefix_cache(server.url, name)
    ask_about(server.url, case.context, FIRST_QUESTION, strategy)
    first = prefix_cache_after(server.url, name, start)
    ask_about(server.url, case.context, SECOND_QUESTION, strategy)
    second = prefix_cache_after(server.url, name, first)
    first_prompt, first_hits = first[0] - start[0], first[1] - start[1]
    second_prompt, second_hits = second[0] - first[0], second[1] - first[1]
    block = 128  # vLLM's CPU block size; a GPU's is smaller
    assert first_prompt > 1000 and second_prompt > first_prompt, (first_prompt, second_prompt)
    assert first_hits < block, "the first request found its fresh document in the cache"
    # Every full block of the document: all but the partial block at its end and the question.
    assert second_hits >= first_prompt - 2 * block, (first_prompt, second_hits)


@pytest.mark.engine
def test_access_log_has_one_json_line_per_request(server: RunningServer) -> None:
    since = len(server.log())
    reply = generate(server.url, "Say something short.", max_new_tokens=7)
    streamed = httpx.post(
        f"{server.url}/generate_stream",
        json={"inputs": prompt("Count to three."), "parameters": {"max_new_tokens": 5}},
        timeout=TIMEOUT,
    )
    assert streamed.status_code == 200
    deadline = time.monotonic() + 10
    while len(entries := access_log_entries(server, since)) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    details = reply["details"]
    mine = [e for e in entries if e.get("max_new_tokens") == 7 and e.get("prompt_tokens") == details["input_length"]]
    assert len(mine) == 1, entries
    entry = mine[0]
    assert re.fullmatch(r"[0-9a-f]{32}", entry["request_id"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["ts"])
    assert entry["strategy"] == "native"
    assert entry["status"] == "success"
    assert entry["finish_reason"] == details["finish_reason"]
    assert entry["generated_tokens"] == details["generated_tokens"]
    assert entry["rows"] == 1
    assert entry["kv_tokens"] == details["input_length"] + details["generated_tokens"]
    assert 0 < entry["ttft_s"] <= entry["duration_s"] < TIMEOUT
    if details["generated_tokens"] > 1:
        assert entry["time_per_output_token_s"] > 0
    stream_entries = [e for e in entries if e.get("max_new_tokens") == 5]
    assert len(stream_entries) == 1 and stream_entries[0]["status"] == "success"
    assert stream_entries[0]["request_id"] != entry["request_id"]
    # Every access line carries the same fields, and only ours (vLLM adds attributes to log records).
    assert all(set(e) >= {"ts", "event", "request_id", "strategy", "status", "duration_s"} for e in entries)
    assert not [k for e in entries for k in e if k.startswith("vllm")], entries


@pytest.mark.engine
def test_prometheus_scrapes_ttft_per_strategy(server: RunningServer, prometheus: PrometheusServer) -> None:
    url = server.url
    other = second_strategy(url)
    strategies = ("native", other)
    # A first request each (it fills the second strategy's RoPE slot), then a measured round.
    for strategy in strategies:
        generate(url, "Warm up.", strategy=strategy, max_new_tokens=2)
    counts = {}
    for strategy in strategies:
        counts[strategy] = value(exposition(url), "ropeserve_time_to_first_token_seconds_count", strategy=strategy)
        prometheus.wait_for(
            f'ropeserve_time_to_first_token_seconds_count{{strategy="{strategy}"}} >= {counts[strategy]}',
            lambda r: len(r) == 1,
            what=f"Prometheus to scrape {strategy}'s first request",
        )
    for i in range(3):
        for strategy in strategies:
            generate(
                url, f"Tell me about the number {i}. ({uuid.uuid4().hex[:6]})", strategy=strategy, max_new_tokens=4
            )
    for strategy in strategies:
        prometheus.wait_for(
            f'ropeserve_time_to_first_token_seconds_count{{strategy="{strategy}"}} >= {counts[strategy] + 3}',
            lambda r: len(r) == 1,
            what=f"Prometheus to scrape {strategy}'s measured requests",
        )

    medians = prometheus.values(TTFT_MEDIAN, by="strategy")
    for strategy in strategies:
        assert strategy in medians, medians
        assert is_number(medians[strategy]) and 0 < medians[strategy] < 320, medians
    # The same per-strategy split for the other latency histograms.
    for metric in ("ropeserve_inter_token_latency_seconds", "ropeserve_request_duration_seconds"):
        p95 = prometheus.values(
            f"histogram_quantile(0.95, sum by (le, strategy) (rate({metric}_bucket[1m])))", by="strategy"
        )
        assert all(is_number(p95.get(s, float("nan"))) for s in strategies), (metric, p95)
    # One engine served both strategies: KV use is reported for it alone.
    kv = prometheus.values("ropeserve_kv_cache_usage_ratio", by="engine")
    assert list(kv) == ["vllm"], kv
    # The shipped alert rules load and evaluate against our series.
    groups = prometheus.api("rules")["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) >= 5
    assert all(rule["health"] in ("ok", "unknown") for rule in rules), rules
    firing = prometheus.query(
        'ALERTS{alertstate="firing", alertname=~"RopeserveTargetDown|RopeserveNoEngine|RopeserveHighErrorRate"}'
    )
    assert firing == [], firing


@pytest.mark.engine
def test_every_dashboard_query_evaluates_on_real_data(server: RunningServer, prometheus: PrometheusServer) -> None:
    generate(server.url, "One more, for the dashboard.", max_new_tokens=4)
    prometheus.wait_for(
        'ropeserve_requests_total{strategy="native", status="success"} > 0',
        lambda r: len(r) == 1,
        what="a scraped request",
    )
    time.sleep(2)  # two more scrapes, so rate() has two samples after the request
    exported = family_names(exposition(server.url))
    empty = []
    for title, expr in dashboard_queries():
        result = prometheus.query(expr)  # raises on anything Prometheus cannot parse or evaluate
        for metric in set(re.findall(r"\b(?:ropeserve|process)_[a-z_]+", expr)):
            assert metric in exported or metric in GPU_ONLY, f"{title}: {metric} is not exported"
        if not result and not any(metric in expr for metric in GPU_ONLY):
            empty.append((title, expr))
    # The key panels have data after real traffic.
    must_have_data = (
        "Time to first token",
        "End-to-end latency",
        "Requests / s by strategy",
        "KV cache use",
        "Engines",
        "Process memory",
    )
    missing = [(t, e) for t, e in empty if t.startswith(must_have_data)]
    assert not missing, missing
    # Grafana's template variables query labels that exist.
    dashboard = json.loads(DASHBOARD.read_text())
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        selector, label = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["definition"]).groups()
        series = prometheus.api("series", **{"match[]": selector.replace("$job", "ropeserve")})
        assert any(label in s for s in series), (variable["name"], series[:3])
