"""Passkey retrieval at several depths (clients/bench_passkey.py's haystack and scoring)."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import httpx

from clients.bench_passkey import make_case, run_trial, spec_for_length
from clients.eval.results import Score


def depths(count: int) -> list[float]:
    """`count` depths spread over the document (0.1 ... 0.9 for 5)."""
    return [(i + 0.5) / count for i in range(count)]


def run_cell(
    client: httpx.Client,
    spec: dict[str, Any],
    length: int,
    native_window: int,
    keys: int,
    count_tokens: Callable[[str], int] | None,
    seed: int,
) -> Score:
    """`keys` passkeys at `keys` depths, one request each (greedy, 12 new tokens)."""
    rng = random.Random(f"{seed}:{length}")
    used = spec_for_length(spec, length, native_window)
    score = Score(strategy=used)
    seconds = []
    for depth in depths(keys):
        case = make_case(length, depth, str(rng.randint(10000, 99999)), count_tokens, instruction_in_inputs=True)
        trial = run_trial(client, case, used, max_new_tokens=12)
        if trial.status == 422:
            score.refused = trial.error[:300]
            return score
        score.trials += 1
        score.correct += trial.correct
        seconds.append(trial.seconds)
    score.seconds = sum(seconds) / len(seconds) if seconds else 0.0
    return score
