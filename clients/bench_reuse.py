"""A document asked twice: the second question's time to first token over the first's, per strategy.

    ropeserve bench reuse --url http://127.0.0.1:8000 --length 16k --out docs/bench/reuse.md

For each strategy, one after the other on an otherwise idle server: a fresh document of `--length`
tokens (varied filler with a pass key inside, seeded per run and strategy, so nothing of it is in
the prefix cache yet) is sent with a short question, then the same document with a different,
longer question. Both are streamed from `/v1/completions` (greedy, `--new-tokens`); the time to
first token is from the send to the first chunk. Around each request the server's
`ropeserve_prefix_cache_{queries,hits}_total{strategy}` are read from /metrics, so the table also
shows the prompt tokens the prefix cache served each one (– where the server has no such series).
Prints a markdown table (and writes it to `--out`); the goal is a ratio <= 0.2. Running it again
on the same server needs another `--seed` (the default is new each run), else the first question
finds its document already cached.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from clients.bench_grid import greedy_completion
from clients.bench_passkey import load_token_counter, make_case, parse_length, parse_strategy

# `nbce` twice: by default its chunks are sized beside the question (a longer one moves the cuts);
# with `chunk_tokens` they are the same whatever the question.
DEFAULT_STRATEGIES = "dynamic_ntk;yarn:factor=4;rerope;self_extend;dca;nbce;nbce:chunk_tokens=7680"
GOAL_RATIO = 0.2
FIRST_QUESTION = "What is the pass key? The pass key is"
# Longer than the first, and different from its first word on: only the document is shared.
SECOND_QUESTION = (
    "Read the text above once more. Somewhere in it, a five-digit number is called the pass key and "
    "repeated twice. Which number is it? Answer with the number only. The pass key is"
)
QUERIES, HITS = "ropeserve_prefix_cache_queries_total", "ropeserve_prefix_cache_hits_total"
# How long to wait for the server's counters to take in a finished request (they follow vLLM's
# per-row stats, recorded as the request's last output is handed over).
METRICS_SETTLE_S = 3.0


@dataclass(frozen=True)
class ReuseCase:
    """One strategy's document and its two questions; `key` is the pass key hidden in it."""

    context: str
    key: str
    first: str = FIRST_QUESTION
    second: str = SECOND_QUESTION


@dataclass
class Asked:
    """One streamed request: its time to first token, the whole request, the text, and the prompt
    tokens the server's prefix cache was queried for and served (None: no such series)."""

    ttft_s: float | None = None
    seconds: float = 0.0
    text: str = ""
    error: str = ""
    queried_tokens: float | None = None
    cached_tokens: float | None = None
    chunks: int = 0  # stream events with output


def make_reuse_case(length: int, seed: int, index: int, count: Callable[[str], int] | None) -> ReuseCase:
    """A document of about `length` tokens with the first question, its filler and key drawn from
    (seed, index, length): another strategy, run or length gets another document."""
    key = str(random.Random(f"{seed}:{index}:{length}").randint(10000, 99999))
    case = make_case(length, 0.5, key, count, varied=True)
    return ReuseCase(context=case.context, key=key)


def prefix_cache_counters(exposition: str, strategy: str) -> tuple[float, float] | None:
    """(queries, hits) of `strategy` in a /metrics text; None when the server exports neither."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name in (QUERIES, HITS) and sample.labels.get("strategy") == strategy:
                found[sample.name] = sample.value
    if not found:
        return None
    return found.get(QUERIES, 0.0), found.get(HITS, 0.0)


def read_counters(client: httpx.Client, strategy: str) -> tuple[float, float] | None:
    try:
        reply = client.get("/metrics")
    except httpx.HTTPError:
        return None
    return prefix_cache_counters(reply.text, strategy) if reply.status_code == 200 else None


def stream_completion(client: httpx.Client, body: dict[str, Any]) -> Asked:
    """One streamed completion: time to its first chunk, the whole request, the text."""
    asked = Asked()
    started = time.monotonic()
    with client.stream("POST", "/v1/completions", json=body) as reply:
        if reply.status_code != 200:
            reply.read()
            asked.error = f"{reply.status_code}: {reply.text[:300]}"
            return asked
        for line in reply.iter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            event = json.loads(line[5:])
            if "error" in event:
                asked.error = str(event["error"])[:300]
                return asked
            if asked.ttft_s is None:
                asked.ttft_s = time.monotonic() - started
            asked.chunks += 1
            asked.text += "".join(c.get("text", "") for c in event.get("choices", []))
    asked.seconds = time.monotonic() - started
    return asked


def ask(client: httpx.Client, strategy: dict[str, Any], context: str, question: str, new_tokens: int) -> Asked:
    """`question` on `context`, streamed, with the server's prefix-cache counters around it."""
    name = str(strategy.get("name"))
    before = read_counters(client, name)
    asked = stream_completion(client, greedy_completion(question, context, strategy, new_tokens))
    if before is None or asked.error:
        return asked
    deadline = time.monotonic() + METRICS_SETTLE_S
    while (after := read_counters(client, name)) is not None:
        if after[0] > before[0] or time.monotonic() > deadline:
            asked.queried_tokens, asked.cached_tokens = after[0] - before[0], after[1] - before[1]
            break
        time.sleep(0.2)
    return asked


def run(args: argparse.Namespace) -> dict[str, Any]:
    count = load_token_counter(args.tokenizer)
    strategies = [parse_strategy(s) for s in args.strategies.split(";") if s.strip()]
    length = parse_length(args.length)
    seed = args.seed if args.seed is not None else int(time.time()) % 1_000_000
    results: dict[str, Any] = {"length": length, "seed": seed, "rows": []}
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with httpx.Client(base_url=args.url, timeout=args.timeout, headers=headers) as client:
        for index, strategy in enumerate(strategies):
            case = make_reuse_case(length, seed, index, count)
            first = ask(client, strategy, case.context, case.first, args.new_tokens)
            second = ask(client, strategy, case.context, case.second, args.new_tokens)
            row = {"strategy": strategy, "key": case.key, "first": asdict(first), "second": asdict(second)}
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
    return results


def _tokens(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f}"


def _found(key: str, asked: dict[str, Any]) -> str:
    return "yes" if key in asked["text"] else "no"


def table(results: dict[str, Any]) -> str:
    """The markdown table: one line per strategy, the second question's TTFT over the first's."""
    lines = [
        f"Document of {results['length']:,} tokens (seed {results['seed']}); goal: 2nd / 1st <= {GOAL_RATIO}.",
        "",
        "| strategy | TTFT 1st (s) | TTFT 2nd (s) | 2nd / 1st | prefix-cache hits 1st / 2nd (of tokens queried) "
        "| key found 1st / 2nd |",
        "|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        name = json.dumps(row["strategy"], separators=(",", ":"))
        first, second = row["first"], row["second"]
        failed = first["error"] or second["error"]
        if failed or first["ttft_s"] is None or second["ttft_s"] is None:
            lines.append(f"| `{name}` | – | – | – | – | {(failed or 'no token')[:80]} |")
            continue
        ratio = second["ttft_s"] / first["ttft_s"] if first["ttft_s"] > 0 else float("inf")
        verdict = "" if ratio <= GOAL_RATIO else " (over the goal)"
        cached = (
            f"{_tokens(first['cached_tokens'])} / {_tokens(second['cached_tokens'])} "
            f"(of {_tokens(second['queried_tokens'])})"
        )
        lines.append(
            f"| `{name}` | {first['ttft_s']:.2f} | {second['ttft_s']:.2f} | {ratio:.3f}{verdict} | {cached} | "
            f"{_found(row['key'], first)} / {_found(row['key'], second)} |"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--length", default="16k", help="prompt tokens of the document and first question")
    parser.add_argument(
        "--strategies", default=DEFAULT_STRATEGIES, help="';'-separated: name, name:key=value,... or JSON objects"
    )
    parser.add_argument("--new-tokens", type=int, default=12, help="greedy tokens per request")
    parser.add_argument("--seed", type=int, help="draws the documents (default: new each run)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per request")
    parser.add_argument("--tokenizer", help="tokenizer dir (default: the bundled model's)")
    parser.add_argument("--api-key", dest="api_key")
    parser.add_argument("--out", help="write the markdown table here")


def cli(args: argparse.Namespace) -> int:
    results = run(args)
    text = table(results)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0
