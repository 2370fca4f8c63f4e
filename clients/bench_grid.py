"""What the per-request benchmarks share: every strategy at every length, each cell on a document of
its own, and the greedy streamed completion they send.

A cell's document is varied filler seeded by its length and its column, so no cell reads another's
prefix from the cache and a rerun reads the same documents.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

import httpx

from clients.bench_passkey import PasskeyCase, load_token_counter, make_case, parse_length, parse_strategy

# What a benchmark measures of one cell: the client, the strategy and the cell's document.
Measure = Callable[[httpx.Client, dict[str, Any], PasskeyCase], dict[str, Any]]


def greedy_completion(question: str, context: str, strategy: dict[str, Any], new_tokens: int) -> dict[str, Any]:
    """A streamed `/v1/completions` body: `question` on `context`, greedy, at most `new_tokens`."""
    return {
        "prompt": question,
        "context": context,
        "strategy": strategy,
        "max_tokens": new_tokens,
        "temperature": 0,
        "stream": True,
    }


def run_grid(
    args: argparse.Namespace, measure: Measure, shown: Callable[[dict[str, Any]], dict[str, Any]] = dict
) -> dict[str, Any]:
    """`measure` at every (length, strategy) of `args.lengths` x `args.strategies`, one cell at a
    time in that order; each cell is printed (`shown` picks what) as it ends."""
    count = load_token_counter(args.tokenizer)
    strategies = [parse_strategy(s) for s in args.strategies.split(";") if s.strip()]
    lengths = [parse_length(x) for x in args.lengths.split(",")]
    results: dict[str, Any] = {"lengths": lengths, "strategies": strategies, "cells": []}
    with httpx.Client(base_url=args.url, timeout=7200) as client:
        for length in lengths:
            for column, strategy in enumerate(strategies):
                case = make_case(length, 0.5, f"{length % 100000:05d}{column}", count, varied=True)
                cell = measure(client, strategy, case)
                cell.update(length=length, strategy=strategy)
                results["cells"].append(cell)
                print(json.dumps(shown(cell)), flush=True)
    return results
