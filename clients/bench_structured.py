"""What structured output costs per generated token, against the same request unconstrained, side by side.

    ropeserve bench structured --url http://127.0.0.1:8000 --lengths 200,16k --strategies "yarn:factor=2;dca;nbce"

For each length and strategy, one document (varied filler seeded per cell) is asked for `--new-tokens`
tokens twice in a row, `--repeats` times: free text (end of sequence ignored), and JSON constrained
by an extraction schema whose array of `--new-tokens`-plus items cannot end before `--new-tokens`
(both finish by length, so both decode exactly `--new-tokens` tokens). The two alternate which goes
first. Each is streamed from /v1/completions with its usage; its per-token time is the time from
its first chunk to its last over its tokens after the first, so the prefill (the document, read
once and then found in the prefix cache) and the grammar's compile (once per schema, before the
first token) are not in it. Prints a markdown table of the medians and their ratio (and writes it
with the raw figures to `--out` as JSON); the goal is a ratio <= 1.15.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import httpx

from clients.bench_grid import greedy_completion, run_grid
from clients.bench_passkey import PasskeyCase

DEFAULT_STRATEGIES = "yarn:factor=2;dca;nbce"
GOAL_RATIO = 1.15
QUESTION = "List every ship of the log above with the crates it carried, as JSON."


def extraction_schema(items: int) -> dict[str, Any]:
    """Ships and crates: an array that holds at least `items` entries, so the output runs to max_tokens."""
    entry = {
        "type": "object",
        "properties": {
            "ship": {"type": "string", "maxLength": 12},
            "crates": {"type": "integer", "minimum": 0, "maximum": 999},
        },
        "required": ["ship", "crates"],
    }
    return {
        "type": "object",
        "properties": {"entries": {"type": "array", "minItems": items, "items": entry}},
        "required": ["entries"],
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--lengths", default="200,16k", help="prompt tokens per document, comma-separated")
    parser.add_argument(
        "--strategies", default=DEFAULT_STRATEGIES, help="';'-separated: name, name:key=value,... or JSON objects"
    )
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="pairs of requests per cell")
    parser.add_argument("--tokenizer", help="tokenizer dir (default: the bundled model's)")
    parser.add_argument("--out", help="write the results as JSON here")


def per_token(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    """One streamed completion: seconds per generated token after the first, and its time to first token."""
    started = time.monotonic()
    first = last = None
    tokens = 0
    finish = None
    with client.stream("POST", "/v1/completions", json=body) as reply:
        if reply.status_code != 200:
            reply.read()
            return {"error": f"{reply.status_code}: {reply.text[:300]}"}
        for line in reply.iter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            event = json.loads(line[5:])
            if "error" in event:
                return {"error": str(event["error"])[:300]}
            if event.get("usage"):
                tokens = int(event["usage"]["completion_tokens"])
            for choice in event.get("choices", []):
                now = time.monotonic()
                first = first if first is not None else now
                last = now
                finish = choice.get("finish_reason") or finish
    if first is None or last is None or tokens < 2:
        return {"error": f"{tokens} tokens streamed"}
    return {"s_per_token": (last - first) / (tokens - 1), "ttft_s": first - started, "tokens": tokens, "finish": finish}


def cell(client: httpx.Client, strategy: dict[str, Any], context: str, new_tokens: int, repeats: int) -> dict[str, Any]:
    base = {**greedy_completion(QUESTION, context, strategy, new_tokens), "stream_options": {"include_usage": True}}
    free = {**base, "ignore_eos": True}
    schema = extraction_schema(new_tokens)
    constrained = {
        **base,
        "response_format": {"type": "json_schema", "json_schema": {"name": "ships", "schema": schema}},
    }
    runs: dict[str, list[dict[str, Any]]] = {"free": [], "json": []}
    for r in range(repeats):
        order = [("free", free), ("json", constrained)]
        for name, body in order if r % 2 == 0 else order[::-1]:
            runs[name].append(per_token(client, body))
    errors = [run["error"] for kind in runs.values() for run in kind if "error" in run]
    if errors:
        return {"error": errors[0]}
    medians = {k: statistics.median(run["s_per_token"] for run in v) for k, v in runs.items()}
    return {
        "free_ms_per_token": 1000 * medians["free"],
        "json_ms_per_token": 1000 * medians["json"],
        "ratio": medians["json"] / medians["free"],
        "runs": runs,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    def measure(client: httpx.Client, strategy: dict[str, Any], case: PasskeyCase) -> dict[str, Any]:
        return cell(client, strategy, case.context, args.new_tokens, args.repeats)

    return run_grid(args, measure, shown=lambda result: {k: v for k, v in result.items() if k != "runs"})


def table(results: dict[str, Any]) -> str:
    lines = [
        "| tokens | strategy | free (ms/token) | JSON schema (ms/token) | constrained / free |",
        "|---|---|---|---|---|",
    ]
    for c in results["cells"]:
        name = json.dumps(c["strategy"], separators=(",", ":"))
        if "error" in c:
            lines.append(f"| {c['length']:,} | `{name}` | – | {c['error'][:80]} | – |")
            continue
        lines.append(
            f"| {c['length']:,} | `{name}` | {c['free_ms_per_token']:.1f} | {c['json_ms_per_token']:.1f} "
            f"| {c['ratio']:.3f}x |"
        )
    return "\n".join(lines)


def cli(args: argparse.Namespace) -> int:
    results = run(args)
    text = table(results)
    print(text)
    worst = max((c["ratio"] for c in results["cells"] if "ratio" in c), default=None)
    if worst is not None:
        print(f"\nworst ratio {worst:.3f}x (goal <= {GOAL_RATIO}x)")
    if args.out:
        Path(args.out).write_text(json.dumps({**results, "table": text}, indent=2))
    return 0
