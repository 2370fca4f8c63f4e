"""Soak: minutes of mixed traffic at about twice what the server serves, then a look at what is left.

    ROPESERVE_MAX_CONCURRENT_REQUESTS=8 ropeserve serve --port 8014 &
    ropeserve bench soak --url http://127.0.0.1:8014 --minutes 5

First it measures what the server serves (8 short native requests at once, requests/s), runs the
same load as below for `--warmup-minutes`, then sends requests open-loop at `--overload` times that rate for `--minutes`: plain native, RoPE
strategies (yarn, ntk, dynamic_ntk, llama3), NBCE over three documents, streamed ones, and
streamed ones whose client disconnects after the first token. Every request has a timeout; loopback
only; the number of requests is bounded by rate x duration.

With `--costly-every N`, one arrival in N is instead a request with the parameters the fourth
hostile-input probe found costly (COSTLY, in turn, on a ~3,300-token document of fresh text): the
smallest attention windows and DCA chunks the strategies accept, the probe's own values (a 422 now),
and `echo` with 20 logprobs; they get `--long-timeout` seconds.

With `--long-documents`, one arrival in `--long-every` is a long document instead (12k-24k tokens
of fresh text, `--long-min-tokens`/`--long-max-tokens`), cycling through window, DCA, RoPE-scaled
and NBCE strategies (LONG_STRATEGIES); they get `--long-timeout` seconds. A server that cannot start
one soon should refuse it with 429 and a Retry-After.

It prints the answers by status (200, 429 with Retry-After, others), requests lost (a connection
error) and hung (no answer within their timeout): the target for both is zero; a 429 without a
`Retry-After` of whole seconds >= 1 counts against the run. After the load has drained: the engine
processes' and the API process's resident memory against before (target: within 5%), KV-cache use
(target: 0) and requests in flight (target: 0).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import sys
import time
from typing import Any

import httpx

from clients.bench_mixed import metric
from clients.bench_passkey import parse_length

KINDS = ("native", "rope", "nbce", "stream", "disconnect")
# Long documents' strategies, in turn: the window family, DCA, RoPE scalings that reach 24k, NBCE.
LONG_STRATEGIES: list[Any] = [
    "dca",
    "rerope",
    "self_extend",
    {"name": "yarn", "factor": 4},
    "dynamic_ntk",
    "nbce",
]
NBCE_DOCUMENTS = 4
# The fourth probe's costly parameters: the smallest the strategies accept (strategies/window.py,
# dca.py), the probe's own (refused: 422), and echo with 20 logprobs of every prompt token.
COSTLY: list[tuple[str, dict[str, Any]]] = [
    ("/generate", {"strategy": {"name": "rerope", "window": 128}}),
    ("/generate", {"strategy": {"name": "dca", "chunk_size": 256, "local_window": 128}}),
    ("/generate", {"strategy": {"name": "self_extend", "window": 128, "group": 4}}),
    ("/generate", {"strategy": {"name": "leaky_rerope", "window": 128}}),
    ("/generate", {"strategy": {"name": "rerope", "window": 1}}),
    ("/generate", {"strategy": {"name": "dca", "chunk_size": 2, "local_window": 1}}),
    ("/v1/completions", {"echo": True, "logprobs": 20}),
]
COSTLY_WORDS = 3_300
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


def long_body(n: int, rng: random.Random, min_tokens: int, max_tokens: int, max_new: int) -> dict[str, Any]:
    """The n-th long document (`min_tokens`..`max_tokens` words: one token each for the bundled
    model) and a question, under LONG_STRATEGIES[n] in turn; NBCE reads it as NBCE_DOCUMENTS documents."""
    words = rng.randint(min_tokens, max_tokens)
    strategy = LONG_STRATEGIES[n % len(LONG_STRATEGIES)]
    context: str | list[str]
    if strategy == "nbce":
        context = [text(rng, words // NBCE_DOCUMENTS) for _ in range(NBCE_DOCUMENTS)]
    else:
        context = text(rng, words)
    inputs = f"Document {n}: which word comes most often in the text?"
    return {"inputs": inputs, "context": context, "strategy": strategy, "parameters": {"max_new_tokens": max_new}}


def costly_body(n: int, rng: random.Random, max_new: int) -> tuple[str, dict[str, Any]]:
    """The n-th costly request (COSTLY in turn) on a fresh document: its route and body."""
    route, extra = COSTLY[n % len(COSTLY)]
    document = text(rng, COSTLY_WORDS)
    if route == "/v1/completions":
        return route, {"prompt": document, "max_tokens": 1, "temperature": 0, **extra}
    question = f"Document {n}: which word comes most often in the text?"
    return route, {"inputs": question, "context": document, "parameters": {"max_new_tokens": max_new}, **extra}


def arrival_kind(i: int, long_every: int) -> str:
    """The kind of the i-th arrival: KINDS in turn, every `long_every`-th a long document (0: none)."""
    if long_every > 0 and i % long_every == long_every - 1:
        return "long"
    return KINDS[(i - (i // long_every if long_every > 0 else 0)) % len(KINDS)]


async def send(
    client: httpx.AsyncClient, kind: str, payload: dict[str, Any], timeout: float, route: str = "/generate"
) -> str:
    """The outcome of one request: its status code, 'disconnected', 'lost', 'hung', 'stream-error',
    'missing-retry-after' or 'bad-retry-after'."""
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
        reply = await client.post(route, json=payload, timeout=timeout)
        return _status(reply)
    except httpx.TimeoutException:
        return "hung"
    except httpx.TransportError:
        return "lost"


def _status(reply: httpx.Response) -> str:
    if reply.status_code == 429:
        return retry_after_problem(reply.headers.get("retry-after")) or "429"
    return str(reply.status_code)


def retry_after_problem(value: str | None) -> str | None:
    """None for a Retry-After of whole seconds >= 1 (what ropeserve sends), else what is wrong."""
    if value is None:
        return "missing-retry-after"
    if not value.strip().isdigit() or int(value) < 1:
        return "bad-retry-after"
    return None


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
    """Open-loop arrivals at `rate` for `seconds`, cycling through KINDS (and long documents, with
    `--long-documents`); waits for every answer."""
    rng = random.Random(seed)
    long_every = args.long_every if args.long_documents else 0
    kinds = KINDS + (("long",) if long_every else ()) + (("costly",) if args.costly_every else ())
    outcomes: dict[str, collections.Counter[str]] = {k: collections.Counter() for k in kinds}
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=None)) as client:
        tasks = []
        for i in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, started + i / rate - time.perf_counter()))
            kind = arrival_kind(i, long_every)
            route = "/generate"
            if args.costly_every and i % args.costly_every == args.costly_every // 2 and kind != "long":
                kind = "costly"
                route, payload = costly_body(i // args.costly_every, rng, args.max_new_tokens)
            elif kind == "long":
                payload = long_body(
                    i // long_every, rng, args.long_min_tokens, args.long_max_tokens, args.max_new_tokens
                )
            else:
                payload = body(kind, i, rng, args.max_new_tokens)
            timeout = args.long_timeout if kind in ("long", "costly") else args.timeout

            async def run(
                kind: str = kind, payload: dict[str, Any] = payload, timeout: float = timeout, route: str = route
            ) -> None:
                outcomes[kind][await send(client, kind, payload, timeout, route)] += 1

            tasks.append(asyncio.create_task(run()))
        await asyncio.gather(*tasks)
    return outcomes


async def drained(url: str, wait_s: float = 120) -> None:
    """Nothing in flight (waiting at most `wait_s`), then one short request so vLLM reports its
    scheduler state again."""
    deadline = time.monotonic() + wait_s
    while metric(url, "ropeserve_requests_in_flight") > 0 and time.monotonic() < deadline:
        await asyncio.sleep(1)
    await asyncio.sleep(5)
    async with httpx.AsyncClient(base_url=url) as client:
        await send(client, "native", body("native", -1, random.Random(0), 2), 120)


# 422: a costly request's parameters past the strategies' bounds, refused as they should be.
ACCEPTED = ("200", "disconnected", "429", "422")
FAILED = ("lost", "hung", "missing-retry-after", "bad-retry-after")


def summary(outcomes: dict[str, collections.Counter[str]]) -> tuple[str, bool]:
    """One line over every kind: served, refused, lost, hung, other; and whether the run passes
    (nothing lost or hung, every 429 with its Retry-After)."""
    every: collections.Counter[str] = sum(outcomes.values(), collections.Counter())
    other = {k: v for k, v in sorted(every.items()) if k not in ACCEPTED + ("lost", "hung")}
    line = (
        f"{sum(every.values())} requests: {every['200'] + every['disconnected']} served, "
        f"{every['429']} refused with 429 + Retry-After, {every['422']} refused with 422, {every['lost']} lost, "
        f"{every['hung']} hung, other: {other}"
    )
    return line, all(every[k] == 0 for k in FAILED)


async def soak(args: argparse.Namespace) -> int:
    url = args.url.rstrip("/")
    # In flight after the load: long documents may still be prefilling when the last one is sent.
    drain_s = max(120.0, args.long_timeout if args.long_documents else 0.0)
    served = await capacity(url, args.max_new_tokens)
    rate = args.overload * served
    if args.warmup_minutes > 0:
        # The same mix first: the engine's buffers and allocator arenas grow to the load's batches
        # once; what the soak measures is whether memory keeps growing after that.
        print(f"warm-up: {args.warmup_minutes:g} min of the same load")
        await load(url, rate, args.warmup_minutes * 60, args, seed=3)
        await drained(url, drain_s)
    before = memory(url)
    total = int(rate * args.minutes * 60)
    mix = f", one in {args.long_every} a long document" if args.long_documents else ""
    mix += f", one in {args.costly_every} a costly one" if args.costly_every else ""
    print(f"capacity {served:.2f} req/s; sending {total} requests at {rate:.2f} req/s for {args.minutes:g} min{mix}")
    started = time.perf_counter()
    outcomes = await load(url, rate, args.minutes * 60, args, seed=7)
    took = time.perf_counter() - started
    for kind, counts in outcomes.items():
        print(f"  {kind:10s} " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    line, passed = summary(outcomes)
    print(f"{line} ({took:.0f} s)")

    await drained(url, drain_s)
    after = memory(url)
    print(
        f"after: in flight {metric(url, 'ropeserve_requests_in_flight'):g}, KV cache use "
        f"{metric(url, 'ropeserve_kv_cache_usage_ratio'):.3f}, running rows {metric(url, 'ropeserve_requests_running'):g}"
    )
    for name, b, a in (("engine processes", before[0], after[0]), ("API process", before[1], after[1])):
        print(f"RSS {name}: {b / 2**30:.3f} -> {a / 2**30:.3f} GiB ({100 * (a - b) / b:+.1f}%; target within 5%)")
    return 0 if passed else 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--overload", type=float, default=2.0, help="send this many times the measured capacity")
    parser.add_argument("--warmup-minutes", type=float, default=1.0, help="the same load before memory is measured")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds a request may take before it counts as hung"
    )
    parser.add_argument(
        "--costly-every",
        type=int,
        default=0,
        help="one arrival in this many is a request with the hostile probe's costly parameters (COSTLY); 0: none",
    )
    parser.add_argument(
        "--long-documents", action="store_true", help="mix in long documents (12k-24k tokens, several strategies)"
    )
    parser.add_argument("--long-every", type=int, default=10, help="with --long-documents: one arrival in this many")
    parser.add_argument("--long-min-tokens", type=parse_length, default=12_000)
    parser.add_argument("--long-max-tokens", type=parse_length, default=24_000)
    parser.add_argument(
        "--long-timeout", type=float, default=1800.0, help="seconds a long document may take before it counts as hung"
    )


def argument_problem(args: argparse.Namespace) -> str | None:
    """What is inconsistent in the long-document and costly options, if anything."""
    if args.costly_every < 0:
        return f"--costly-every must be >= 0 (got {args.costly_every})"
    if not args.long_documents:
        return None
    if args.long_every < 1:
        return f"--long-every must be >= 1 (got {args.long_every})"
    if not 0 < args.long_min_tokens <= args.long_max_tokens:
        return f"need 0 < --long-min-tokens <= --long-max-tokens (got {args.long_min_tokens}, {args.long_max_tokens})"
    return None


def cli(args: argparse.Namespace) -> int:
    if (problem := argument_problem(args)) is not None:
        print(problem, file=sys.stderr)
        return 2
    return asyncio.run(soak(args))
