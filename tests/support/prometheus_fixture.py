"""A real Prometheus (the Debian `prometheus` package) scraping the session's real server with the
shipped config (deploy/prometheus/prometheus.yml + alerts.yml), and helpers around it.

Reuse: `from tests.support.prometheus_fixture import prometheus` in a test module brings the session-scoped
`prometheus` fixture; `start_prometheus(tmp_dir, "127.0.0.1:PORT")` starts one for another server.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import RunningServer

ROOT = Path(__file__).resolve().parents[2]
DEPLOY_PROMETHEUS = ROOT / "deploy" / "prometheus"
SCRAPE_INTERVAL = "1s"
# Ports for what these tests start themselves.
PORT_RANGE = range(8100, 8200)


def find_tool(name: str) -> str:
    """promtool / prometheus: on PATH or where Debian's `prometheus` package puts them."""
    path = shutil.which(name) or next(
        (p for p in (f"/usr/bin/{name}", f"/usr/local/bin/{name}") if os.access(p, os.X_OK)), None
    )
    if path is None:
        pytest.fail(
            f"{name} not found: install the Debian package `prometheus` "
            "(`ROPESERVE_WITH_TESTS=1 bash scripts/setup.sh` does; or apt-get install -y prometheus)"
        )
    return path


def free_port_in_range(ports: range = PORT_RANGE) -> int:
    for port in ports:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {ports.start}-{ports.stop - 1}")


def scrape_config_for(target: str, scrape_interval: str = SCRAPE_INTERVAL) -> dict[str, Any]:
    """The shipped scrape config, pointed at `target`, scraping and evaluating every `scrape_interval`."""
    config = yaml.safe_load((DEPLOY_PROMETHEUS / "prometheus.yml").read_text())
    config.setdefault("global", {}).update(scrape_interval=scrape_interval, evaluation_interval=scrape_interval)
    config["rule_files"] = [str(DEPLOY_PROMETHEUS / f) for f in config.get("rule_files", [])]
    for job in config["scrape_configs"]:
        job["scrape_interval"] = scrape_interval
        job["scrape_timeout"] = scrape_interval
        for static in job.get("static_configs", []):
            static["targets"] = [target]
    return config


@dataclass
class PrometheusServer:
    url: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def api(self, path: str, **params: Any) -> Any:
        reply = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=30)
        body = reply.json()
        if body.get("status") != "success":
            raise PromQLError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query; the vector's samples (raises PromQLError when Prometheus refuses it)."""
        data = self.api("query", query=expr)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def values(self, expr: str, by: str) -> dict[str, float]:
        return {s["metric"].get(by, ""): float(s["value"][1]) for s in self.query(expr)}

    def wait_for(
        self, expr: str, ok: Callable[[list[dict[str, Any]]], bool], timeout: float = 60, what: str = ""
    ) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        result: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            result = self.query(expr)
            if ok(result):
                return result
            time.sleep(0.5)
        raise AssertionError(f"timed out waiting for {what or expr}; last result: {result}")


class PromQLError(RuntimeError):
    pass


def is_number(value: float) -> bool:
    return not (math.isnan(value) or math.isinf(value))


def start_prometheus(tmp_dir: Path, target: str, timeout: float = 60) -> PrometheusServer:
    tmp_dir.mkdir(parents=True, exist_ok=True)
    config_path = tmp_dir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(scrape_config_for(target), sort_keys=False))
    port = free_port_in_range()
    log_path = tmp_dir / "prometheus.log"
    log_file = open(log_path, "wb")  # noqa: SIM115 - lives as long as the process
    process = subprocess.Popen(
        [
            find_tool("prometheus"),
            f"--config.file={config_path}",
            f"--storage.tsdb.path={tmp_dir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=1h",
            "--log.level=warn",
        ],
        cwd=tmp_dir,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    server = PrometheusServer(f"http://127.0.0.1:{port}", process, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"prometheus exited with {process.returncode}:\n{server.log()[-3000:]}")
        try:
            if httpx.get(f"{server.url}/-/ready", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    stop_prometheus(server)
    raise RuntimeError(f"prometheus not ready in {timeout}s:\n{server.log()[-3000:]}")


def stop_prometheus(server: PrometheusServer) -> None:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait()


@pytest.fixture(scope="session")
def prometheus(server: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    """Prometheus scraping the session's server every second with the shipped config and rules;
    yields once the target has been scraped successfully."""
    target = server.url.removeprefix("http://")
    running = start_prometheus(tmp_path_factory.mktemp("prometheus"), target)
    try:
        running.wait_for(
            'up{job="ropeserve"} == 1', lambda r: len(r) == 1, timeout=30, what="the first successful scrape"
        )
        yield running
    finally:
        stop_prometheus(running)
