"""The measured policy `auto` follows: per length band, the strategies ranked by their mean
score over the tasks measured at that length (or those named: `ropeserve eval --policy-tasks`
ranks by the kept varied-text tasks alone; a strategy is a candidate when it was measured on all
of them). Ties: more trials first (a cell measured under two seeds is the stronger evidence),
then the lower perplexity past the native window, up to the band's length, where the grid measured
its curve (the text read as a whole, a second measure of the same quality), then the order they
were evaluated in, e.g. native first. Request times on a shared machine are too noisy to break ties.
A strategy beats `native` only by more than the noise of the leader's score (one standard error of
its mean over the tasks, from its trials): inside the window, a difference of a trial or two is no
reason to run a slower kernel than the model's own, so `native` within that margin ranks first.

Format (read by strategies/auto_policy.py):

    {"model": "...", "native_window": 8192, "source": "...",
     "bands": [{"up_to_tokens": 16000,
                "ranked": [{"strategy": {"name": "dynamic_ntk", "factor": 2.0}, "score": 0.9,
                            "tasks": {"passkey": "5/5", "niah_single_1": "4/5"},
                            "measured_on": "...", "perplexity_past_window": 21.3}, ...]}, ...]}

`tasks` holds the cells that decided (each task's correct/trials, or a continuous task's mean
score and trials, at the band's length) and `measured_on` what they were measured on, so `auto`'s
reason names them.

A request of `n` tokens (prompt + max_new_tokens) uses the first band with `up_to_tokens >= n`.
Grids measured apart (e.g. docs/eval to 16k, docs/eval/long from 16k to 64k) join in one policy
through `merged_policy`: a length measured by a later grid replaces an earlier grid's band.
"""

from __future__ import annotations

import math
from statistics import fmean, pvariance
from typing import Any

from clients.bench_passkey import spec_for_length
from clients.eval.results import EvalResults, Score

# What each task reads, for the policy's `measured_on`.
TEXTS = {
    "passkey": "the classic passkey haystack (memorized by small models: a smoke test)",
    "fact_recall": "varied text (Austen's novels)",
    "fact_recall_paraphrased": "varied text (Austen's novels)",
    "fact_recall_question": "varied text (Austen's novels)",
    "continuation": "varied text (Austen's novels)",
    "distant_copy": "varied text (Austen's novels)",
}


def measured_on(tasks: list[str]) -> str:
    """What the tasks read, each text once.

    >>> measured_on(["fact_recall", "continuation"])
    "varied text (Austen's novels)"
    """
    texts = dict.fromkeys(TEXTS.get(task, f"RULER's {task}") for task in tasks)
    return "; ".join(texts)


def measured_tasks(results: EvalResults, length: int, only: list[str] | None = None) -> list[str]:
    """The tasks (of `only`, if given) some strategy was measured on at this length (a grid may
    measure a task at some lengths only, e.g. passkey alone at 64k)."""
    return [
        task
        for task, by_strategy in results.tasks.items()
        if (only is None or task in only)
        and any(
            (cell := cells.get(str(length))) is not None and cell.accuracy is not None for cells in by_strategy.values()
        )
    ]


def perplexity_past_window(results: EvalResults, label: str, length: int) -> float | None:
    """The mean perplexity of the strategy's curve over its windows past the native window and
    inside `length` tokens; None where it has no such window (no curve, refused, too short)."""
    curve = results.perplexity.get(label)
    if curve is None or curve.refused:
        return None
    past = [
        ppl
        for i, ppl in enumerate(curve.ppl)
        if i * curve.bucket >= results.native_window and (i + 1) * curve.bucket <= length
    ]
    return round(fmean(past), 3) if past else None


def standard_error(scores: list[Score]) -> float:
    """The standard error of the mean of the cells' scores (each cell its task), from the spread
    of each cell's trials (a 0/1 task's p(1 - p); a continuous task's trial scores).

    >>> round(standard_error([Score(correct=16, trials=20)]), 4), standard_error([Score(correct=3, trials=3)])
    (0.0894, 0.0)
    """
    variances = []
    for score in scores:
        values = [r["score"] for r in score.records if isinstance(r.get("score"), (int, float))]
        if len(values) == score.trials and values:
            variances.append(pvariance(values) / len(values))
        elif score.trials:
            p = score.correct / score.trials
            variances.append(p * (1 - p) / score.trials)
    return math.sqrt(sum(variances)) / len(scores) if scores else 0.0


def native_within_noise(ranked: list[tuple[tuple[Any, ...], dict[str, Any], float]]) -> list[dict[str, Any]]:
    """The band's entries by score, with `native` first where its score is within one standard
    error of the leader's."""
    ordered = sorted(ranked, key=lambda r: r[0])
    if ordered:
        leader_score, leader_error = ordered[0][1]["score"], ordered[0][2]
        for i, (_, entry, _) in enumerate(ordered):
            if entry["label"] == "native" and entry["score"] >= leader_score - leader_error:
                ordered.insert(0, ordered.pop(i))
                break
    return [entry for _, entry, _ in ordered]


def measured_policy(results: EvalResults, source: str, only: list[str] | None = None) -> dict[str, Any]:
    bands = []
    for length in sorted(results.lengths):
        ranked = []
        tasks = measured_tasks(results, length, only)
        for order, (label, spec) in enumerate(zip(results.strategies, results.specs, strict=True)):
            if spec.get("name") == "auto":
                continue  # a column to compare with, never a choice of its own policy
            # A candidate of the band was measured on every task measured there.
            scores = {task: results.tasks[task].get(label, {}).get(str(length)) for task in tasks}
            if not scores or any(s is None or s.accuracy is None for s in scores.values()):
                continue  # refused, or not measured at this length: not a candidate
            measured = {task: s for task, s in scores.items() if s is not None}
            accuracy = sum(s.accuracy or 0.0 for s in measured.values()) / len(measured)
            seconds = sum(s.seconds for s in measured.values()) / len(measured)
            trials = sum(s.trials for s in measured.values())
            perplexity = perplexity_past_window(results, label, length)
            ranked.append(
                (
                    (-accuracy, -trials, perplexity if perplexity is not None else float("inf"), order),
                    {
                        "strategy": spec_for_length(spec, length, results.native_window),
                        "label": label,
                        "score": round(accuracy, 4),
                        "seconds": round(seconds, 2),
                        "tasks": {task: s.describe() for task, s in measured.items()},
                        "measured_on": measured_on(list(measured)),
                        "perplexity_past_window": perplexity,
                    },
                    standard_error(list(measured.values())),
                )
            )
        if ranked:
            bands.append({"up_to_tokens": length, "ranked": native_within_noise(ranked)})
    return {"model": results.model, "native_window": results.native_window, "source": source, "bands": bands}


def merged_policy(grids: list[EvalResults], source: str, only: list[str] | None = None) -> dict[str, Any]:
    """One policy from several grids of the same model, band by band; where two grids measured the
    same length, the later one's band is kept (its cells are the newer measurement)."""
    if len({(g.model, g.native_window) for g in grids}) > 1:
        raise ValueError("the grids were measured on different models")
    bands: dict[int, dict[str, Any]] = {}
    for grid in grids:
        for band in measured_policy(grid, source, only)["bands"]:
            bands[band["up_to_tokens"]] = band
    first = grids[0]
    return {
        "model": first.model,
        "native_window": first.native_window,
        "source": source,
        "bands": [bands[length] for length in sorted(bands)],
    }
