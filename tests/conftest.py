"""Shared fixtures. The real server (vLLM + bundled SmolLM2) starts once per test session."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

# Fixtures of their own module: a real Prometheus server scraping the session server.
pytest_plugins = ["tests.support.prometheus_fixture"]

ROOT = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 600
PLUGIN_SERVER_MAX_NEW_TOKENS = 16
# Every end-to-end test belongs to a tier (pyproject.toml's markers; scripts/test.sh selects them).
TIERS = ("default_tier", "long_tier")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """No end-to-end test without a tier: it would run in no tier, or in one by accident."""
    untiered = [
        item.nodeid
        for item in items
        if (ROOT / "tests" / "e2e") in item.path.parents and not any(item.get_closest_marker(t) for t in TIERS)
    ]
    if untiered:
        raise pytest.UsageError(f"end-to-end tests without a tier marker {TIERS}: {untiered}")


def engine_core_processes(server_pid: int) -> list:
    """The vLLM engine-core processes under a server (psutil.Process list).

    vLLM titles the process "VLLM::EngineCore" in its argv; its comm is cut at 15 characters."""
    import psutil

    children = psutil.Process(server_pid).children(recursive=True)
    return [p for p in children if "EngineCore" in " ".join(p.cmdline())]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    url: str
    process: subprocess.Popen
    log_path: Path
    startup_seconds: float

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _sigint_as_in_a_terminal() -> None:
    """Ctrl-C's default disposition in the server, whatever the test runner inherited: a shell
    runs background jobs with SIGINT ignored, and Python keeps it ignored (no KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_server(tmp_dir: Path, extra_env: dict[str, str] | None = None, name: str = "server") -> RunningServer:
    port = free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "ROPESERVE_PORT": str(port),
        "ROPESERVE_KV_CACHE_GIB": os.environ.get("ROPESERVE_TEST_KV_CACHE_GIB", "2"),
        # float32 so engine logits can be compared token-exactly with transformers references
        # (NBCE exactness, server/service/lockstep.py); bf16 kernels differ in rounding.
        "ROPESERVE_DTYPE": os.environ.get("ROPESERVE_TEST_DTYPE", "float32"),
        "PYTHONUNBUFFERED": "1",
        # Admission by queued work off: tests send bursts of documents to one-core float32 engines
        # whose estimated waits pass the default bound; tests/e2e/test_queue_admission.py sets its own.
        "ROPESERVE_MAX_QUEUE_WAIT_S": "0",
        **(extra_env or {}),
    }
    log_path = tmp_dir / f"{name}.log"
    log_file = open(log_path, "wb")  # noqa: SIM115 - lives as long as the server
    started = time.monotonic()
    # A new session, so the test can check that the whole process group is gone after shutdown.
    process = subprocess.Popen(
        [sys.executable, "-m", "clients.cli", "serve"],
        cwd=ROOT,
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=_sigint_as_in_a_terminal,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = started + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log_path.read_text()[-5000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return RunningServer(url, process, log_path, time.monotonic() - started)
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop_server(RunningServer(url, process, log_path, 0))
    raise RuntimeError(f"server did not become healthy in {STARTUP_TIMEOUT_S}s:\n{log_path.read_text()[-5000:]}")


def process_group_alive(pgid: int) -> bool:
    """Whether any live (non-zombie) process is left in the group."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command name: state, ppid, pgrp, ...
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def stop_server(server: RunningServer, sig: int = signal.SIGTERM, timeout: float = 60) -> int | None:
    if server.process.poll() is None:
        server.process.send_signal(sig)
        try:
            server.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait()
    return server.process.returncode


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """The one real server of the session: `ropeserve serve` on the bundled model."""
    running = start_server(tmp_path_factory.mktemp("server"))
    print(f"\nserver started in {running.startup_seconds:.1f} s", file=sys.stderr)
    yield running
    stop_server(running)


@pytest.fixture(scope="session")
def plugin_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A second real server, for what the shared one must not have: the test plugin installed (its
    strategies listed) and small request limits (at most 16 new tokens, 2,000 characters of input,
    64 KiB bodies), so that fuzzing it keeps every generated request short. One for the session:
    tests/e2e/test_plugin_server.py and tests/e2e/test_api_fuzz.py share its start."""
    from tests.support.plugins import install_plugin

    site = tmp_path_factory.mktemp("plugin-site")
    install_plugin(site)
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    running = start_server(
        tmp_path_factory.mktemp("plugin-server"),
        {
            "PYTHONPATH": path,
            "ROPESERVE_KV_CACHE_GIB": "1",
            "ROPESERVE_MAX_NEW_TOKENS_LIMIT": str(PLUGIN_SERVER_MAX_NEW_TOKENS),
            "ROPESERVE_MAX_INPUT_CHARS": "2000",
            "ROPESERVE_MAX_BODY_BYTES": "65536",
        },
        name="plugin",
    )
    yield running
    stop_server(running)


@pytest.fixture(scope="session")
def base_url(request: pytest.FixtureRequest) -> str:
    """The session server, or an already running one named by ROPESERVE_TEST_URL (float32!), for
    quick loops while developing."""
    url = os.environ.get("ROPESERVE_TEST_URL")
    return url if url else request.getfixturevalue("server").url


@pytest.fixture
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=300) as client:
        yield client
