"""Short requests while a long document is prefilled: their time to first token, phase by phase.

    ropeserve bench priority --url http://127.0.0.1:8000 --long-tokens 24k --strategy dca
    ropeserve bench priority --url http://127.0.0.1:8000 --compare-url http://127.0.0.1:8001 --phases plain

Each phase sends one long document (`--long-tokens` of varied filler, seeded per phase and server,
so nothing comes from the prefix cache; `--strategy`, default `dca`), waits `--lead-s` so its
prefill is under way, then sends a "Hi"-sized request every `--interval-s` until the document's
first token arrives (at most `--shorts`). Everything is streamed from `/v1/completions`; a short
request's TTFT is from its send to its first chunk. Phases, in the order given (`--phases`):

- `plain`: no `priority` field (what the server does by default);
- `priority`: the short requests carry `"priority": --short-priority` (lower is earlier, as in vLLM);
- `fcfs`: every request carries `"priority": 0` (first come, first served).

The phases of one server run one after the other in one run, so "before" and "after" are measured
side by side; `--compare-url` runs the same phases against a second server (two builds, or two
settings of `ROPESERVE_LONG_PREFILL_TOKENS`). Prints a markdown table: the document's TTFT and
whole request, and p50/p95/max TTFT of the short requests; refusals (429) and errors are counted,
not timed. Bounded: a fixed number of requests, each with a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from clients.bench_passkey import load_token_counter, make_case, parse_length, parse_strategy

# Phase -> (priority of the short requests, of the long document); None: the field is left out.
PHASES: dict[str, tuple[int | None, int | None]] = {"plain": (None, None), "priority": (-1, None), "fcfs": (0, 0)}
SHORT_PROMPT = "Hi {i}!"


@dataclass
class Outcome:
    status: int  # HTTP status; 0: no answer (timeout or connection error)
    ttft_s: float | None = None
    seconds: float = 0.0
    error: str = ""


@dataclass
class PhaseResult:
    server: str
    phase: str
    long: Outcome
    shorts: list[Outcome] = field(default_factory=list)

    def short_ttfts(self) -> list[float]:
        return [s.ttft_s for s in self.shorts if s.status == 200 and s.ttft_s is not None]


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between ranks (numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def long_document(tokens: int, seed: int, count: Callable[[str], int] | None) -> tuple[str, str]:
    """(context, question): about `tokens` tokens in all, filler drawn at random (seeded)."""
    case = make_case(tokens, 0.5, f"{seed:05d}", count, varied=True)
    return case.context, case.inputs


def completion_body(
    prompt: str, max_tokens: int, priority: int | None, context: str | None = None, strategy: Any = None
) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    if context is not None:
        body["context"] = context
    if strategy is not None:
        body["strategy"] = strategy
    if priority is not None:
        body["priority"] = priority
    return body


def event_of(line: str) -> dict[str, Any] | None:
    """The JSON of one SSE `data:` line; None for other lines and the final `[DONE]`."""
    if not line.startswith("data:") or line[5:].strip() == "[DONE]":
        return None
    event: dict[str, Any] = json.loads(line[5:])
    return event


async def streamed(
    client: httpx.AsyncClient, body: dict[str, Any], timeout: float, first_token: asyncio.Event | None = None
) -> Outcome:
    """One streamed completion: its status, time to the first chunk (`first_token` is set then) and to the end."""
    started = time.perf_counter()
    first: float | None = None
    try:
        async with client.stream("POST", "/v1/completions", json=body, timeout=timeout) as reply:
            if reply.status_code != 200:
                text = (await reply.aread()).decode(errors="replace")
                return Outcome(reply.status_code, seconds=time.perf_counter() - started, error=text[:200])
            async for line in reply.aiter_lines():
                event = event_of(line)
                if event is None:
                    continue
                if "error" in event:
                    return Outcome(200, first, time.perf_counter() - started, str(event["error"])[:200])
                if first is None:
                    first = time.perf_counter() - started
                    if first_token is not None:
                        first_token.set()
    except (httpx.TimeoutException, httpx.TransportError) as exc:
        return Outcome(0, first, time.perf_counter() - started, f"{type(exc).__name__}: {exc}"[:200])
    return Outcome(200, first, time.perf_counter() - started)


async def phase(url: str, name: str, seed: int, args: argparse.Namespace, count: Any) -> PhaseResult:
    short_priority, long_priority = PHASES[name]
    if name == "priority":
        short_priority = args.short_priority
    context, question = long_document(args.long_tokens, seed, count)
    strategy = parse_strategy(args.strategy)
    long_body = completion_body(question, args.long_max_tokens, long_priority, context, strategy)
    async with httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=None)) as client:
        prefilled = asyncio.Event()
        document = asyncio.create_task(streamed(client, long_body, args.timeout, prefilled))
        await asyncio.sleep(args.lead_s)
        shorts: list[asyncio.Task[Outcome]] = []
        # Until the document's first token (the end of its prefill), one "Hi" per interval.
        while not prefilled.is_set() and not document.done() and len(shorts) < args.shorts:
            body = completion_body(SHORT_PROMPT.format(i=len(shorts)), args.short_max_tokens, short_priority)
            shorts.append(asyncio.create_task(streamed(client, body, args.timeout)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(prefilled.wait(), args.interval_s)
        result = PhaseResult(url, name, await document, list(await asyncio.gather(*shorts)))
    print(json.dumps(asdict(result)), flush=True)
    return result


def table(results: Sequence[PhaseResult]) -> str:
    lines = [
        "| server | phase | document TTFT (s) | document (s) | short requests | short TTFT p50 (s) | p95 (s) | max (s) | refused / errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ttfts = r.short_ttfts()
        refused = sum(1 for s in r.shorts if s.status == 429)
        errors = sum(1 for s in r.shorts if s.status not in (200, 429) or (s.status == 200 and s.error))
        doc = f"{r.long.ttft_s:.1f}" if r.long.ttft_s is not None else f"– ({r.long.status} {r.long.error[:40]})"
        cells = [f"{percentile(ttfts, q):.1f}" if ttfts else "–" for q in (50, 95, 100)]
        lines.append(
            f"| {r.server} | {r.phase} | {doc} | {r.long.seconds:.1f} | {len(ttfts)} | "
            + " | ".join(cells)
            + f" | {refused} / {errors} |"
        )
    return "\n".join(lines)


def parse_phases(text: str) -> list[str]:
    phases = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in phases if p not in PHASES]
    if unknown or not phases:
        raise argparse.ArgumentTypeError(f"phases are a comma-separated list of {', '.join(PHASES)} (got {text!r})")
    return phases


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--compare-url", help="a second server to run the same phases against")
    parser.add_argument("--phases", type=parse_phases, default=["plain", "priority"], help=", ".join(PHASES))
    parser.add_argument("--long-tokens", type=parse_length, default=24_000, help="the document's prompt tokens")
    parser.add_argument("--strategy", default="dca", help="the document's: name, name:k=v,... or a JSON object")
    parser.add_argument("--long-max-tokens", type=int, default=4)
    parser.add_argument("--shorts", type=int, default=8, help="short requests at most per phase")
    parser.add_argument("--interval-s", type=float, default=15.0, help="seconds between short requests")
    parser.add_argument("--lead-s", type=float, default=10.0, help="seconds from the document to the first short")
    parser.add_argument("--short-max-tokens", type=int, default=4)
    parser.add_argument("--short-priority", type=int, default=-1, help="in the `priority` phase")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds any one request may take")
    parser.add_argument("--tokenizer", help="tokenizer to size the document (default: the bundled model's)")
    parser.add_argument("--out", help="write the results as JSON here")


async def run(args: argparse.Namespace) -> list[PhaseResult]:
    count = load_token_counter(args.tokenizer)
    servers = [args.url.rstrip("/")] + ([args.compare_url.rstrip("/")] if args.compare_url else [])
    results = []
    for s, url in enumerate(servers):
        for p, name in enumerate(args.phases):
            results.append(await phase(url, name, 100 * s + p + 1, args, count))
    return results


def cli(args: argparse.Namespace) -> int:
    results = asyncio.run(run(args))
    text = table(results)
    print(text)
    if args.out:
        Path(args.out).write_text(json.dumps({"results": [asdict(r) for r in results], "table": text}, indent=2))
    return 0 if all(r.long.status == 200 for r in results) else 1
