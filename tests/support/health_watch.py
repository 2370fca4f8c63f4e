"""`/health` polled from a process of its own while a test sends hostile requests.

A process of its own, so that what the test does to build and send its bodies (30 MB of them)
does not delay the polls: what is measured is the server's answer time alone.

    with HealthWatch(url) as watch:
        ...  # hostile requests
    assert watch.report["max_s"] < 0.5

Run as a module it is the poller: `python -m tests.support.health_watch URL [INTERVAL_S]`, until
its stdin closes; then it prints one JSON line (count, max_s, p99_s, not_200).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


class HealthWatch:
    def __init__(self, url: str, interval_s: float = 0.05) -> None:
        self.url = url
        self.interval_s = interval_s
        self.report: dict[str, Any] = {}
        self._process: subprocess.Popen[str] | None = None

    def __enter__(self) -> HealthWatch:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "tests.support.health_watch", self.url, str(self.interval_s)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        time.sleep(1.0)  # its first polls answered before the test starts
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        assert self._process is not None
        out, _ = self._process.communicate("", timeout=120)
        self.report = json.loads(out.strip().splitlines()[-1])


def poll(url: str, interval_s: float) -> dict[str, Any]:
    import httpx

    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    latencies: list[float] = []
    not_200: list[str] = []
    with httpx.Client(timeout=30) as client:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                status = str(client.get(f"{url}/health").status_code)
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            latencies.append(time.perf_counter() - started)
            if status != "200":
                not_200.append(status)
            time.sleep(interval_s)
    latencies.sort()
    return {
        "count": len(latencies),
        "max_s": round(latencies[-1], 4) if latencies else None,
        "p99_s": round(latencies[int(len(latencies) * 0.99)], 4) if latencies else None,
        "not_200": not_200[:20],
    }


if __name__ == "__main__":
    print(json.dumps(poll(sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 0.05)))
