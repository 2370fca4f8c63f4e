"""Soak: minutes of mixed traffic at about twice what the server serves, then a look at what is left.

    ROPESERVE_MAX_CONCURRENT_REQUESTS=8 ropeserve serve --port 8014 &
    ropeserve bench soak --url http://127.0.0.1:8014 --minutes 5

First it measures what the server serves (8 short native requests at once, requests/s), runs the
same load as below for `--warmup-minutes`, then sends requests open-loop at `--overload` times that rate for `--minutes`: plain native, RoPE
strategies (yarn, ntk, dynamic_ntk, llama3), NBCE over three documents, streamed ones, and
streamed ones whose client disconnects after the first token. Every request has a timeout; loopback
only; the number of requests is bounded by rate x duration.

It prints the answers by status (200, 429 with Retry-After, others), requests lost (timed out or a
connection error: the target is zero), and after the load has drained: the engine processes' and
the API process's resident memory against before (target: within 5%), KV-cache use (target: 0)
and requests in flight (target: 0).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import time
from typing import Any

import httpx

from clients.bench_mixed import metric

KINDS = ("native", "rope", "nbce", "stream", "disconnect")
ROPE = [{"name": "yarn", "factor": 2}, {"name": "ntk", "factor": 3}, "dynamic_ntk", {"name": "llama3", "factor": 4}]
WORDS = [
    "river",
    "stone",
    "light",
    "garden",
    "paper",
    "window",
    "silver",
    "morning",
    "forest",
    "letter",
    "music",
    "harbor",
]


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def body(kind: str, i: int, rng: random.Random, max_new: int) -> dict[str, Any]:
    inputs = f"<|im_start|>user\nRequest {i}: {text(rng, 40)}. Summarize.<|im_end|>\n<|im_start|>assistant\n"
    out: dict[str, Any] = {"inputs": inputs, "parameters": {"max_new_tokens": max_new}}
    if kind == "rope":
        out["strategy"] = ROPE[i % len(ROPE)]
    elif kind == "nbce":
        out["strategy"] = "nbce"
        out["context"] = [text(rng, 120) for _ in range(3)]
    return out


async def send(client: httpx.AsyncClient, kind: str, payload: dict[str, Any], timeout: float) -> str:
    """The outcome of one request: its status code, 'disconnected', 'lost' or 'missing-retry-after'."""
    try:
        if kind in ("stream", "disconnect"):
            async with client.stream("POST", "/generate_stream", json=payload, timeout=timeout) as reply:
                if reply.status_code != 200:
                    await reply.aread()
                    return _status(reply)
                async for line in reply.aiter_lines():
                    if line.startswith("data:"):
                        if kind == "disconnect":
                            return "disconnected"  # leaving the block closes the connection
                        if '"error"' in line and json.loads(line[5:]).get("error"):
                            return "stream-error"
            return "200"
        reply = await client.post("/generate", json=payload, timeout=timeout)
        return _status(reply)
    except (httpx.TimeoutException, httpx.TransportError):
        return "lost"


def _status(reply: httpx.Response) -> str:
    if reply.status_code == 429 and "retry-after" not in reply.headers:
        return "missing-retry-after"
    return str(reply.status_code)


async def capacity(url: str, max_new: int) -> float:
    rng = random.Random(1)
    async with httpx.AsyncClient(base_url=url) as client:
        started = time.perf_counter()
        outcomes = await asyncio.gather(
            *(send(client, "native", body("native", i, rng, max_new), 300) for i in range(8))
        )
    assert all(o == "200" for o in outcomes), outcomes
    return 8 / (time.perf_counter() - started)


def memory(url: str) -> tuple[float, float]:
    return (
        metric(url, "ropeserve_engine_processes_resident_memory_bytes"),
        metric(url, "process_resident_memory_bytes"),
    )


async def load(
    url: str, rate: float, seconds: float, args: argparse.Namespace, seed: int
) -> dict[str, collections.Counter[str]]:
    """Open-loop arrivals at `rate` for `seconds`, cycling through KINDS; waits for every answer."""
    rng = random.Random(seed)
    outcomes: dict[str, collections.Counter[str]] = {k: collections.Counter() for k in KINDS}
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=None)) as client:
        tasks = []
        for i in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, started + i / rate - time.perf_counter()))
            kind = KINDS[i % len(KINDS)]
            payload = body(kind, i, rng, args.max_new_tokens)

            async def run(kind: str = kind, payload: dict[str, Any] = payload) -> None:
                outcomes[kind][await send(client, kind, payload, args.timeout)] += 1

            tasks.append(asyncio.create_task(run()))
        await asyncio.gather(*tasks)
    return outcomes


async def drained(url: str) -> None:
    """Nothing in flight, then one short request so vLLM reports its scheduler state again."""
    deadline = time.monotonic() + 120
    while metric(url, "ropeserve_requests_in_flight") > 0 and time.monotonic() < deadline:
        await asyncio.sleep(1)
    await asyncio.sleep(5)
    async with httpx.AsyncClient(base_url=url) as client:
        await send(client, "native", body("native", -1, random.Random(0), 2), 120)


async def soak(args: argparse.Namespace) -> int:
    url = args.url.rstrip("/")
    served = await capacity(url, args.max_new_tokens)
    rate = args.overload * served
    if args.warmup_minutes > 0:
        # The same mix first: the engine's buffers and allocator arenas grow to the load's batches
        # once; what the soak measures is whether memory keeps growing after that.
        print(f"warm-up: {args.warmup_minutes:g} min of the same load")
        await load(url, rate, args.warmup_minutes * 60, args, seed=3)
        await drained(url)
    before = memory(url)
    total = int(rate * args.minutes * 60)
    print(f"capacity {served:.2f} req/s; sending {total} requests at {rate:.2f} req/s for {args.minutes:g} min")
    started = time.perf_counter()
    outcomes = await load(url, rate, args.minutes * 60, args, seed=7)
    took = time.perf_counter() - started
    for kind, counts in outcomes.items():
        print(f"  {kind:10s} " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    every = sum(outcomes.values(), collections.Counter())
    answered = every["200"] + every["disconnected"]
    print(
        f"{total} requests in {took:.0f} s: {answered} served, {every['429']} refused with 429 (+Retry-After), "
        f"{every['lost']} lost, other: {dict((k, v) for k, v in every.items() if k not in ('200', '429', 'lost', 'disconnected'))}"
    )

    await drained(url)
    after = memory(url)
    print(
        f"after: in flight {metric(url, 'ropeserve_requests_in_flight'):g}, KV cache use "
        f"{metric(url, 'ropeserve_kv_cache_usage_ratio'):.3f}, running rows {metric(url, 'ropeserve_requests_running'):g}"
    )
    for name, b, a in (("engine processes", before[0], after[0]), ("API process", before[1], after[1])):
        print(f"RSS {name}: {b / 2**30:.3f} -> {a / 2**30:.3f} GiB ({100 * (a - b) / b:+.1f}%; target within 5%)")
    return 0 if every["lost"] == 0 else 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--overload", type=float, default=2.0, help="send this many times the measured capacity")
    parser.add_argument("--warmup-minutes", type=float, default=1.0, help="the same load before memory is measured")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds a request may take before it counts as lost"
    )


def cli(args: argparse.Namespace) -> int:
    return asyncio.run(soak(args))
