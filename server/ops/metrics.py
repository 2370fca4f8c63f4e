"""Prometheus metrics (names per docs/CONTRACT.md). Labels stay bounded: strategy names, statuses and
engine names (RoPE type and factor), never parameter values or prompts.

Two sources feed this room:
- `GenerationService` times what the client sees (TTFT, inter-token latency, duration, tokens),
  because only it sees a request whole (an NBCE request is several engine rows);
- the engine's stats listener (`engine_listener`) passes on what vLLM already measures per
  iteration: KV-cache use, running/waiting requests, preemptions, and per finished row the
  scheduler queue time, the prefill time and the prompt tokens the prefix cache served. It is
  duck-typed on vLLM's stats objects, so nothing here imports vLLM; vLLM's own Prometheus logger
  (metric names with colons) stays off.

One engine serves every strategy, so the `engine` label is the engine's kind ("vllm").
"""

from __future__ import annotations

import logging
import os
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from server.engines.base import Engine, EngineIteration, FinishedRow

log = logging.getLogger(__name__)

# `*_created` series double every counter and histogram and nothing here reads them.
disable_created_metrics()

# Latency buckets span a GPU's milliseconds and a 2-core CPU's tens of seconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12)
KV_TOKEN_BUCKETS = (128, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144)

REQUEST_STATUSES = ("success", "error", "cancelled", "overloaded", "invalid", "timeout")
# Label for a request whose strategy name is not registered (the name itself is client input).
UNKNOWN_STRATEGY = "unknown"
# Request ids are uuid4().hex; engine rows of one request (NBCE) extend it with a suffix.
REQUEST_ID_CHARS = 32
MAX_TRACKED_REQUESTS = 8192
# The engine's parallel settings as labels of `ropeserve_engine_ranks` (`Parallelism.labels()`).
PARALLELISM_LABELS = (
    "tensor_parallel_size",
    "pipeline_parallel_size",
    "data_parallel_size",
    "distributed_executor_backend",
)
# Label names: series per strategy (what the client sees) or per engine (what the engine does).
BY_STRATEGY = ("strategy",)
BY_ENGINE = ("engine",)

# The reasons a request is refused for capacity (the `reason` label of the refusals' counter).
REFUSAL_REASONS = ("draining", "engine_down", "max_concurrent_requests", "rope_slots", "prefill_backlog", "rows_full")


# Most series are labelled by strategy or by engine alone: one constructor each, so a declaration
# says only its name, its help and (for histograms) its buckets.
def strategy_histogram(name: str, doc: str, buckets: tuple[float, ...], registry: CollectorRegistry) -> Histogram:
    return Histogram(name, doc, BY_STRATEGY, buckets=buckets, registry=registry)


def strategy_counter(name: str, doc: str, registry: CollectorRegistry) -> Counter:
    return Counter(name, doc, BY_STRATEGY, registry=registry)


def engine_gauge(name: str, doc: str, registry: CollectorRegistry) -> Gauge:
    return Gauge(name, doc, BY_ENGINE, registry=registry)


def engine_counter(name: str, doc: str, registry: CollectorRegistry) -> Counter:
    return Counter(name, doc, BY_ENGINE, registry=registry)


@dataclass(frozen=True)
class AdmissionFigures:
    """Admission's figures, as /metrics shows them (server/service/admission.py makes them)."""

    queued_prompt_tokens: int
    queued_decode_tokens: int
    requests: int
    # The wait of a new one-row request behind everything tracked.
    estimated_wait_s: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    refusals: dict[str, int]


class GpuMemoryCollector(Collector):
    """Device memory in use and in total per GPU; registered only where a GPU exists.

    vLLM's engine core is another process, so per-process counters of this one would read 0:
    this reads the device (NVML when installed, else torch.cuda.mem_get_info).
    """

    def __init__(self) -> None:
        self._nvml: Any = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self.device_count = int(pynvml.nvmlDeviceGetCount())
        except Exception:  # noqa: BLE001 - no NVML (or no driver): fall back to torch
            self._nvml = None
            self.device_count = _torch_cuda_device_count()

    def _read(self) -> Iterator[tuple[str, int, int]]:
        for i in range(self.device_count):
            try:
                if self._nvml is not None:
                    info = self._nvml.nvmlDeviceGetMemoryInfo(self._nvml.nvmlDeviceGetHandleByIndex(i))
                    yield str(i), int(info.used), int(info.total)
                else:
                    import torch

                    free, total = torch.cuda.mem_get_info(i)
                    yield str(i), int(total - free), int(total)
            except Exception:  # a scrape must not fail because a driver call did
                log.debug("could not read memory of GPU %d", i, exc_info=True)

    def collect(self) -> Iterable[GaugeMetricFamily]:
        used = GaugeMetricFamily("ropeserve_gpu_memory_used_bytes", "GPU memory in use (whole device).", labels=["gpu"])
        total = GaugeMetricFamily("ropeserve_gpu_memory_total_bytes", "GPU memory in total.", labels=["gpu"])
        for gpu, u, t in self._read():
            used.add_metric([gpu], u)
            total.add_metric([gpu], t)
        yield used
        yield total


def _torch_cuda_device_count() -> int:
    try:
        import torch

        return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - no usable CUDA: no GPU gauges
        return 0


class ChildProcessMemoryCollector(Collector):
    """Resident memory of this process's children: vLLM's engine cores, which hold weights and
    (on CPU) the KV cache. `process_resident_memory_bytes` covers only the API process."""

    def __init__(self) -> None:
        import psutil

        self._me = psutil.Process(os.getpid())
        self._psutil = psutil

    def collect(self) -> Iterable[GaugeMetricFamily]:
        total = 0
        for child in self._me.children(recursive=True):
            try:
                total += child.memory_info().rss
            except (self._psutil.NoSuchProcess, self._psutil.AccessDenied):
                continue
        yield GaugeMetricFamily(
            "ropeserve_engine_processes_resident_memory_bytes",
            "Resident memory of the server's child processes (vLLM engine cores).",
            value=total,
        )


def _register_memory_collectors(registry: CollectorRegistry, gpu: bool | None) -> None:
    """The memory of the engine processes beside the API process (and of the GPUs, where there are)."""
    if gpu is None:
        gpu = _torch_cuda_device_count() > 0
    if gpu:
        registry.register(GpuMemoryCollector())
    try:
        registry.register(ChildProcessMemoryCollector())
    except Exception:  # psutil is vLLM's dependency; without it, this one gauge is absent
        log.debug("no child-process memory gauge", exc_info=True)


class AdmissionMetrics:
    """Admission by queued work (server/service/admission.py): the wait it estimates, the work it counts,
    the throughput it learned (set at every scrape), and the requests refused for capacity by reason."""

    def __init__(self, r: CollectorRegistry) -> None:
        self.estimated_wait = Gauge(
            "ropeserve_admission_estimated_wait_seconds",
            "Estimated wait before the engine would start a new request queued behind all tracked work.",
            registry=r,
        )
        self.queued_prompt_tokens = Gauge(
            "ropeserve_admission_queued_prompt_tokens",
            "Prompt tokens (all rows) of admitted requests not yet prefilled.",
            registry=r,
        )
        self.queued_decode_tokens = Gauge(
            "ropeserve_admission_queued_decode_tokens",
            "Tokens admitted requests may still decode (max_new_tokens left, all rows).",
            registry=r,
        )
        self.rate = Gauge(
            "ropeserve_admission_tokens_per_second",
            "The engine's throughput as admission learned it from its steps, by phase (prefill, decode).",
            ("phase",),
            registry=r,
        )
        self.refusals = Counter(
            "ropeserve_requests_refused",
            "Requests refused for capacity (429/503) by reason: draining, engine_down, max_concurrent_requests, "
            "rope_slots, or the estimated queue wait past the bound (prefill_backlog, rows_full).",
            ("reason",),
            registry=r,
        )
        for reason in REFUSAL_REASONS:
            self.refusals.labels(reason)

    def refresh(self, figures: AdmissionFigures) -> None:
        self.estimated_wait.set(figures.estimated_wait_s)
        self.queued_prompt_tokens.set(figures.queued_prompt_tokens)
        self.queued_decode_tokens.set(figures.queued_decode_tokens)
        self.rate.labels("prefill").set(figures.prefill_tokens_per_s)
        self.rate.labels("decode").set(figures.decode_tokens_per_s)


class PrefixCacheMetrics:
    """Prompt tokens of finished engine rows looked up in vLLM's prefix cache and served by it, per
    strategy: vLLM's own `prefix_cache_queries` and `prefix_cache_hits`, with the row's strategy."""

    def __init__(self, r: CollectorRegistry) -> None:
        self.queries = strategy_counter(
            "ropeserve_prefix_cache_queries",
            "Prompt tokens of finished engine rows looked up in vLLM's prefix cache (every row of NBCE).",
            r,
        )
        self.hits = strategy_counter(
            "ropeserve_prefix_cache_hits",
            "Prompt tokens of finished engine rows that vLLM's prefix cache served (not computed again).",
            r,
        )
        self.counters = (self.queries, self.hits)

    def count(self, strategy: str, row: FinishedRow) -> None:
        self.queries.labels(strategy).inc(row.prompt_tokens)
        self.hits.labels(strategy).inc(row.cached_tokens)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, gpu: bool | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self._add_client_view(self.registry)
        self._add_vllm_measures(self.registry)
        self._add_engine_gauges(self.registry)
        self.admission = AdmissionMetrics(self.registry)
        self.prefix_cache = PrefixCacheMetrics(self.registry)
        _register_memory_collectors(self.registry, gpu)
        self._request_strategy: OrderedDict[str, str] = OrderedDict()
        self._seen_engines: weakref.WeakSet[Engine] = weakref.WeakSet()
        self._slot_loads_seen = 0

    def _add_client_view(self, r: CollectorRegistry) -> None:
        """What the client sees, per strategy (fed by GenerationService)."""
        self.time_to_first_token = strategy_histogram(
            "ropeserve_time_to_first_token_seconds",
            "Time from request arrival to its first generated token.",
            LATENCY_BUCKETS,
            r,
        )
        self.inter_token_latency = strategy_histogram(
            "ropeserve_inter_token_latency_seconds",
            "Time between consecutive generated tokens of one request.",
            TOKEN_LATENCY_BUCKETS,
            r,
        )
        self.request_duration = strategy_histogram(
            "ropeserve_request_duration_seconds",
            "Time from request arrival to its last token (end to end).",
            LATENCY_BUCKETS,
            r,
        )
        self.requests = Counter(
            "ropeserve_requests", "Requests by strategy and outcome.", (*BY_STRATEGY, "status"), registry=r
        )
        self.prompt_tokens = strategy_counter(
            "ropeserve_prompt_tokens", "Prompt tokens of finished requests (all rows).", r
        )
        self.generated_tokens = strategy_counter("ropeserve_generated_tokens", "Generated tokens.", r)
        self.request_kv_tokens = strategy_histogram(
            "ropeserve_request_kv_tokens",
            "KV-cache tokens a request held at its peak (NBCE counts every row).",
            KV_TOKEN_BUCKETS,
            r,
        )
        self.requests_in_flight = Gauge(
            "ropeserve_requests_in_flight", "Requests being served now.", BY_STRATEGY, registry=r
        )

    def _add_vllm_measures(self, r: CollectorRegistry) -> None:
        """What vLLM measures per iteration (fed by `engine_listener`)."""
        self.request_queue_time = strategy_histogram(
            "ropeserve_request_queue_time_seconds",
            "Time a request's engine rows waited in vLLM's scheduler queue (as vLLM measures it).",
            LATENCY_BUCKETS,
            r,
        )
        self.request_prefill_time = strategy_histogram(
            "ropeserve_request_prefill_time_seconds",
            "Time from a row's scheduling to its first token (as vLLM measures it).",
            LATENCY_BUCKETS,
            r,
        )
        self.requests_running = engine_gauge(
            "ropeserve_requests_running", "Engine rows vLLM's scheduler is running, per engine.", r
        )
        self.requests_queued = engine_gauge(
            "ropeserve_requests_queued", "Engine rows waiting in vLLM's scheduler queue, per engine.", r
        )
        self.kv_cache_usage = engine_gauge(
            "ropeserve_kv_cache_usage_ratio", "Fraction of the KV cache in use, per engine.", r
        )
        self.preemptions = engine_counter(
            "ropeserve_engine_preemptions", "Rows vLLM preempted (KV cache full), per engine.", r
        )

    def _add_engine_gauges(self, r: CollectorRegistry) -> None:
        """The running engine: its start, its ranks, its RoPE slots (refreshed by `refresh_engine`)."""
        self.engines = Gauge("ropeserve_engines", "Engines running.", registry=r)
        self.engine_startup = engine_gauge(
            "ropeserve_engine_startup_seconds", "How long the running engine took to start.", r
        )
        self.engine_starts = engine_counter(
            "ropeserve_engine_starts",
            "Engines started since the server started (1: strategies never start engines).",
            r,
        )
        self.engine_ranks = Gauge(
            "ropeserve_engine_ranks",
            "Worker processes of the running engine (tensor x pipeline x data parallel), labelled with its parallel settings.",
            (*BY_ENGINE, *PARALLELISM_LABELS),
            registry=r,
        )
        self.rope_slots = engine_gauge(
            "ropeserve_rope_slots", "RoPE slots of the engine's cos/sin table (besides the native one).", r
        )
        self.rope_slots_in_use = engine_gauge(
            "ropeserve_rope_slots_in_use", "RoPE slots held by running requests' configurations.", r
        )
        self.rope_slot_loads = engine_counter(
            "ropeserve_rope_slot_loads",
            "RoPE configurations placed in a slot (each a cos/sin table built in the engine).",
            r,
        )

    # --- requests -------------------------------------------------------------------------------

    def init_strategies(self, names: Iterable[str]) -> None:
        """Export every registered strategy's series at zero from the start, so `rate()` sees a
        strategy's first request as an increase and dashboards list strategies before traffic."""
        for name in names:
            for histogram in (
                self.time_to_first_token,
                self.inter_token_latency,
                self.request_duration,
                self.request_kv_tokens,
                self.request_queue_time,
                self.request_prefill_time,
            ):
                histogram.labels(name)
            for counter in (self.prompt_tokens, self.generated_tokens, *self.prefix_cache.counters):
                counter.labels(name)
            for status in REQUEST_STATUSES:
                self.requests.labels(name, status)
            self.requests_in_flight.labels(name)

    def track_request(self, request_id: str, strategy: str) -> None:
        """Remember a request's strategy so vLLM's per-row stats can be labelled with it."""
        self._request_strategy[request_id[:REQUEST_ID_CHARS]] = strategy
        while len(self._request_strategy) > MAX_TRACKED_REQUESTS:
            self._request_strategy.popitem(last=False)

    def _strategy_of(self, engine_request_id: str | None) -> str | None:
        if not engine_request_id:
            return None
        return self._request_strategy.get(engine_request_id[:REQUEST_ID_CHARS])

    # --- engines --------------------------------------------------------------------------------

    def engine_listener(self, engine: Engine, iteration: EngineIteration) -> None:
        """The engine's stats listener (`StatsListener`): called after every engine iteration."""
        label = engine.kind
        if iteration.kv_cache_usage is not None:
            self.kv_cache_usage.labels(label).set(iteration.kv_cache_usage)
        if iteration.running_requests is not None:
            self.requests_running.labels(label).set(iteration.running_requests)
        if iteration.waiting_requests is not None:
            self.requests_queued.labels(label).set(iteration.waiting_requests)
        if iteration.preempted_rows:
            self.preemptions.labels(label).inc(iteration.preempted_rows)
        for row in iteration.finished:
            strategy = self._strategy_of(row.request_id)
            if strategy is not None:
                self.request_queue_time.labels(strategy).observe(row.queued_s)
                self.request_prefill_time.labels(strategy).observe(row.prefill_s)
                self.prefix_cache.count(strategy, row)

    def refresh_engine(self, engine: Engine) -> None:
        """The engine's gauges, at start-up and at every scrape."""
        label = engine.kind
        self.engines.set(1)
        if engine not in self._seen_engines:  # a new engine: at start-up, or a restart
            self._seen_engines.add(engine)
            self.engine_starts.labels(label).inc()
            self._slot_loads_seen = 0
            self.engine_ranks.clear()
            self.engine_ranks.labels(engine=label, **engine.parallelism.labels()).set(engine.parallelism.ranks)
        if engine.startup_seconds is not None:
            self.engine_startup.labels(label).set(engine.startup_seconds)
        stats = engine.stats()
        self.kv_cache_usage.labels(label).set(stats.kv_cache_usage)
        self.requests_running.labels(label).set(stats.running_requests)
        self.requests_queued.labels(label).set(stats.waiting_requests)
        self.rope_slots.labels(label).set(stats.rope_slots)
        self.rope_slots_in_use.labels(label).set(stats.rope_slots_in_use)
        if stats.rope_slot_loads > self._slot_loads_seen:
            self.rope_slot_loads.labels(label).inc(stats.rope_slot_loads - self._slot_loads_seen)
            self._slot_loads_seen = stats.rope_slot_loads

    def refresh_admission(self, figures: AdmissionFigures) -> None:
        """Admission's figures, at every scrape."""
        self.admission.refresh(figures)
