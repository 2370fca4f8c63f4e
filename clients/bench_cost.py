"""What a strategy that changes positions costs per request, against dynamic_ntk, side by side.

    ropeserve bench cost --url http://127.0.0.1:8000 --lengths 16k,32k

For each length, every strategy reads its own fresh document (varied filler seeded per request, so
nothing comes from the prefix cache) of that many tokens, one request at a time on the otherwise
idle server, streamed: time to the first token (the prefill) and the whole request (`--new-tokens`
greedy tokens). The strategies of one length run one after the other, so their ratios to
dynamic_ntk's time are measured in the same run, under the same conditions. Prints a markdown table
(and writes it with the raw figures to `--out` as JSON).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import httpx

from clients.bench_grid import greedy_completion, run_grid
from clients.bench_passkey import PasskeyCase
from clients.bench_reuse import stream_completion

DEFAULT_STRATEGIES = "dynamic_ntk;rerope;leaky_rerope;self_extend;dca"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--lengths", default="16k,32k", help="prompt tokens per request, comma-separated")
    parser.add_argument(
        "--strategies", default=DEFAULT_STRATEGIES, help="';'-separated: name, name:key=value,... or JSON objects"
    )
    parser.add_argument("--baseline", default="dynamic_ntk", help="the strategy the ratios divide by")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--tokenizer", help="tokenizer dir (default: the bundled model's)")
    parser.add_argument("--out", help="write the results as JSON here")


def one_request(client: httpx.Client, strategy: dict[str, Any], case: PasskeyCase, new_tokens: int) -> dict[str, Any]:
    """One streamed OpenAI completion (greedy, exactly `new_tokens` tokens: end of sequence ignored)."""
    body = {**greedy_completion(case.inputs, case.context, strategy, new_tokens), "ignore_eos": True}
    asked = stream_completion(client, body)
    if asked.error:
        return {"error": asked.error}
    return {"ttft_s": asked.ttft_s, "seconds": asked.seconds, "chunks": asked.chunks}


def run(args: argparse.Namespace) -> dict[str, Any]:
    return run_grid(args, lambda client, strategy, case: one_request(client, strategy, case, args.new_tokens))


def table(results: dict[str, Any], baseline: str) -> str:
    lines = [
        "| tokens | strategy | TTFT (s) | request (s) | request / " + baseline + " |",
        "|---|---|---|---|---|",
    ]
    for length in results["lengths"]:
        cells = [c for c in results["cells"] if c["length"] == length]
        base = next((c for c in cells if c["strategy"].get("name") == baseline and "seconds" in c), None)
        for c in cells:
            name = json.dumps(c["strategy"], separators=(",", ":"))
            if "error" in c:
                lines.append(f"| {length:,} | `{name}` | – | {c['error'][:80]} | – |")
                continue
            ratio = f"{c['seconds'] / base['seconds']:.2f}x" if base else "–"
            lines.append(f"| {length:,} | `{name}` | {c['ttft_s']:.1f} | {c['seconds']:.1f} | {ratio} |")
    return "\n".join(lines)


def cli(args: argparse.Namespace) -> int:
    results = run(args)
    text = table(results, args.baseline)
    print(text)
    if args.out:
        Path(args.out).write_text(json.dumps({**results, "table": text}, indent=2))
    return 0
