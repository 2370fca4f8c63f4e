"""The per-request benchmarks' grid (clients/bench_grid.py): every strategy at every length in
order, each cell on a document of its own, the same documents on a rerun. No server: the
measure here records what it was given."""

from __future__ import annotations

import argparse
from typing import Any

import httpx

from clients.bench_grid import greedy_completion, run_grid
from clients.bench_passkey import PasskeyCase

ARGS = argparse.Namespace(url="http://127.0.0.1:9", tokenizer=None, strategies="native; rerope", lengths="1k,2k")


def documents(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    seen: list[str] = []

    def measure(client: httpx.Client, strategy: dict[str, Any], case: PasskeyCase) -> dict[str, Any]:
        seen.append(case.context)
        return {"chars": len(case.context), "runs": [1, 2]}

    return run_grid(args, measure, shown=lambda cell: {k: v for k, v in cell.items() if k != "runs"}), seen


def test_every_cell_in_order_on_a_document_of_its_own() -> None:
    results, seen = documents(ARGS)
    cells = [(c["length"], c["strategy"]["name"]) for c in results["cells"]]
    assert cells == [(1000, "native"), (1000, "rerope"), (2000, "native"), (2000, "rerope")]
    assert len(set(seen)) == 4
    assert seen[2:] != seen[:2] and len(seen[2]) > len(seen[0])


def test_a_rerun_reads_the_same_documents() -> None:
    assert documents(ARGS)[1] == documents(ARGS)[1]


def test_the_printed_line_is_what_shown_picks(capsys: Any) -> None:
    documents(ARGS)
    assert '"runs"' not in capsys.readouterr().out


def test_the_completion_is_greedy_and_streamed() -> None:
    body = greedy_completion("q?", "doc", {"name": "native"}, 8)
    assert body == {
        "prompt": "q?",
        "context": "doc",
        "strategy": {"name": "native"},
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
    }
