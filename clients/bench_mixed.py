"""Mixed RoPE strategies against one strategy, side by side on one running server.

    ropeserve bench mixed --url http://127.0.0.1:8000 --requests 24 --concurrency 4 --rounds 2

Each round runs the same workload twice, in alternating order: once with every request `native`
(single-strategy), once round-robin over eight RoPE configurations (native, linear, ntk, yarn,
llama3, dynamic_ntk and two more factors). Requests are streamed; a quarter are long (`--long`
tokens), the rest short (`--short`); every prompt is different, so no request finds another's
prefix in the cache. It prints:

- throughput (requests/s) of each phase and the mixed/single ratio (target >= 0.9);
- the first request of never-used configurations: their TTFT against the TTFT of short
  requests of configurations already in use, sent one at a time on the idle server;
- the engine processes' resident memory after the single-strategy phase and after the mixed one,
  and the size of the slot tables the new configurations filled (target: the growth is within it);
- engine starts reported by `/metrics` before and after (target: no new start) and the engine
  processes alive (`ps`: one engine core).

Bounded: a fixed number of requests, loopback only, each with a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import time
from dataclasses import dataclass
from typing import Any

import httpx

from clients.bench_passkey import VARIED_FILLER, load_token_counter

MIXED = [
    "native",
    {"name": "linear", "factor": 2},
    {"name": "ntk", "factor": 2},
    {"name": "yarn", "factor": 2},
    {"name": "llama3", "factor": 4},
    {"name": "dynamic_ntk"},
    {"name": "ntk", "factor": 4},
    {"name": "yarn", "factor": 3},
]
FRESH = [{"name": "yarn", "factor": 3.3}, {"name": "ntk", "factor": 5.5}, {"name": "llama3", "factor": 6.5}]


@dataclass
class Result:
    seconds: float
    ttft: float
    tokens: int


def prompt(tokens: int, seed: int, count: Any) -> str:
    """A chat prompt of about `tokens` tokens (at most that many when a tokenizer counts them)."""
    rng = random.Random(seed)
    sentences: list[str] = []
    while True:
        used = count(" ".join(sentences)) if count else 15 * len(sentences)
        left = tokens - 40 - used
        if left <= 20:
            break
        sentences += [rng.choice(VARIED_FILLER) for _ in range(max(1, left // 30))]
    text = " ".join(sentences)
    return "<|im_start|>user\n" + text + "\nSummarize the text in one sentence.<|im_end|>\n<|im_start|>assistant\n"


async def one(client: httpx.AsyncClient, inputs: str, strategy: Any, max_new: int) -> Result:
    body = {"inputs": inputs, "strategy": strategy, "parameters": {"max_new_tokens": max_new, "do_sample": False}}
    started = time.perf_counter()
    ttft = None
    tokens = 0
    async with client.stream("POST", "/generate_stream", json=body) as reply:
        if reply.status_code != 200:
            raise RuntimeError(f"{reply.status_code}: {(await reply.aread()).decode()[:300]}")
        async for line in reply.aiter_lines():
            if line.startswith("data:"):
                event = json.loads(line[5:])
                if "error" in event:
                    raise RuntimeError(event["error"])
                tokens += 1
                if ttft is None:
                    ttft = time.perf_counter() - started
    return Result(time.perf_counter() - started, ttft or 0.0, tokens)


async def phase(
    url: str, prompts: list[str], strategies: list[Any], concurrency: int, max_new: int
) -> tuple[float, list[Result]]:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(prompts)):
        queue.put_nowait(i)
    results: list[Result] = []

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            results.append(await one(client, prompts[i], strategies[i % len(strategies)], max_new))

    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=900) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return time.perf_counter() - started, results


def metric(url: str, name: str) -> float:
    total = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            head, _, value = line.rpartition(" ")
            if head.split("{")[0] == name:
                total += float(value)
    return total


def engine_cores() -> int:
    # vLLM titles the process "VLLM::EngineCore" in its argv (comm is cut at 15 characters).
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return sum(1 for line in out.splitlines() if "EngineCore" in line)


def slot_table_bytes(url: str, configurations: int) -> float:
    """What `configurations` full slots of the table hold: rows x rotary dim x dtype bytes."""
    info = httpx.get(f"{url}/info", timeout=30).json()
    rows = info.get("max_context_tokens") or info["native_context_window"]
    dtype_bytes = 4 if "32" in info.get("model_dtype", "float32") else 2
    head_dim = info.get("head_dim", 64)
    return configurations * rows * head_dim * dtype_bytes


def cli(args: argparse.Namespace) -> int:
    count = load_token_counter(None)
    url = args.url.rstrip("/")
    lengths = [args.long if i % 4 == 0 else args.short for i in range(args.requests)]

    async def run() -> int:
        starts_before = metric(url, "ropeserve_engine_starts_total")
        print(f"engine cores before: {engine_cores()}, engine starts: {starts_before:g}")
        # Warm-up: both code paths once.
        await phase(url, [prompt(args.short, 10**6 + i, count) for i in range(2)], ["native"], 2, args.max_new_tokens)
        ratios: list[float] = []
        rss: dict[str, float] = {}
        for rnd in range(args.rounds):
            order = ["single", "mixed"] if rnd % 2 == 0 else ["mixed", "single"]
            took: dict[str, float] = {}
            for kind in order:
                prompts = [prompt(n, hash((rnd, kind, i)) & 0xFFFFFFF, count) for i, n in enumerate(lengths)]
                strategies = ["native"] if kind == "single" else MIXED
                seconds, results = await phase(url, prompts, strategies, args.concurrency, args.max_new_tokens)
                took[kind] = seconds
                # The first single phase runs before any mixed one: RSS with one configuration.
                rss.setdefault(kind, metric(url, "ropeserve_engine_processes_resident_memory_bytes"))
                print(
                    f"round {rnd + 1} {kind:6s}: {len(results)} requests in {seconds:6.1f} s = "
                    f"{len(results) / seconds:.3f} req/s; median TTFT {statistics.median(r.ttft for r in results):.2f} s; "
                    f"engine RSS {metric(url, 'ropeserve_engine_processes_resident_memory_bytes') / 2**30:.2f} GiB"
                )
            ratios.append(took["single"] / took["mixed"])
        print(
            f"mixed/single throughput: {', '.join(f'{r:.3f}' for r in ratios)}; median {statistics.median(ratios):.3f} (target >= 0.9)"
        )

        # TTFT of never-used configurations vs configurations in use, one request at a time.
        async with httpx.AsyncClient(base_url=url, timeout=900) as client:
            seen, fresh = [], []
            for i, spec in enumerate(FRESH):
                seen.append(
                    (await one(client, prompt(args.short, 7_000 + i, count), MIXED[1 + i], args.max_new_tokens)).ttft
                )
                fresh.append((await one(client, prompt(args.short, 8_000 + i, count), spec, args.max_new_tokens)).ttft)
        print(
            f"TTFT, configuration in use: {', '.join(f'{t:.3f}' for t in seen)} s; never used before: "
            f"{', '.join(f'{t:.3f}' for t in fresh)} s; ratio of medians {statistics.median(fresh) / statistics.median(seen):.3f}"
        )

        growth = rss.get("mixed", 0) - rss.get("single", 0)
        tables = slot_table_bytes(url, len(MIXED) - 1)
        print(
            f"engine RSS single {rss['single'] / 2**30:.3f} GiB, mixed ({len(MIXED)} configurations) "
            f"{rss['mixed'] / 2**30:.3f} GiB: growth {growth / 2**20:.1f} MiB; {len(MIXED) - 1} full slot tables "
            f"{tables / 2**20:.1f} MiB (target: growth within it)"
        )
        starts_after = metric(url, "ropeserve_engine_starts_total")
        print(
            f"engine starts after: {starts_after:g} (new: {starts_after - starts_before:g}); engine cores: {engine_cores()}"
        )
        return 0

    return asyncio.run(run())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--requests", type=int, default=24, help="requests per phase")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--short", type=int, default=300, help="tokens of a short prompt")
    parser.add_argument("--long", type=int, default=6000, help="tokens of a long prompt (every fourth)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
