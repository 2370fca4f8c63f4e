"""What a cell cost the server: wall seconds, CPU seconds of the server's processes (the API
process and vLLM's engine-core children, from /proc through psutil) and the prefix-cache tokens
looked up and served (the server's own /metrics), read before and after.

The CPU seconds are read only where the server runs on this machine: its pid is given, or found
as the process listening on the URL's port.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from urllib.parse import urlparse

import httpx

CACHE_QUERIES = "ropeserve_prefix_cache_queries_total"
CACHE_HITS = "ropeserve_prefix_cache_hits_total"


@dataclass(frozen=True)
class Reading:
    at: float
    cpu_s: float | None
    cache_queries: float
    cache_hits: float

    def since(self, before: Reading) -> dict[str, float | None]:
        cpu = None if self.cpu_s is None or before.cpu_s is None else round(self.cpu_s - before.cpu_s, 2)
        return {
            "wall_s": round(self.at - before.at, 2),
            "cpu_s": cpu,
            "cache_queries": self.cache_queries - before.cache_queries,
            "cache_hits": self.cache_hits - before.cache_hits,
        }


def counter_total(metrics_text: str, name: str) -> float:
    """The sum of a counter over all its labels in a Prometheus exposition.

    >>> counter_total('x_total{strategy="a"} 3.0\\nx_total{strategy="b"} 4.0\\nx_created 1', "x_total")
    7.0
    """
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def listening_pid(url: str) -> int | None:
    """The pid of the local process listening on the URL's port, if psutil can see it."""
    import psutil

    parsed = urlparse(url)
    if parsed.hostname not in ("127.0.0.1", "localhost", "0.0.0.0", "::1"):
        return None
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                return int(conn.pid)
    except psutil.Error:
        return None
    return None


def process_tree_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process and its living descendants."""
    import psutil

    try:
        root = psutil.Process(pid)
        total = 0.0
        for proc in [root, *root.children(recursive=True)]:
            try:
                times = proc.cpu_times()
            except psutil.Error:
                continue  # a child that ended between listing and reading
            total += times.user + times.system
        return total
    except psutil.Error:
        return None


class ServerMeter:
    def __init__(self, client: httpx.Client, pid: int | None) -> None:
        self.client = client
        self.pid = pid

    def read(self) -> Reading:
        text = self.client.get("/metrics").text
        return Reading(
            at=time.perf_counter(),
            cpu_s=process_tree_cpu_seconds(self.pid) if self.pid else None,
            cache_queries=counter_total(text, CACHE_QUERIES),
            cache_hits=counter_total(text, CACHE_HITS),
        )
