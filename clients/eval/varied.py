"""The varied-text tasks' cells (fact_recall, continuation: through /generate; distant_copy:
through prompt logprobs), each measured with its cost on the server.

A generation cell builds its documents (fresh text: no other cell's document starts the same
way) and asks all of a document's probes after it: the server puts `context` first and the
question after, so the later probes of a document read its KV blocks from vLLM's prefix cache and
a cell costs about one prefill per document. The first probe's dry run records what the server
would run (for `auto`, its pick and reason) and every reply's `strategy` is kept; the prefix-cache
tokens a document's first probe was served from the cache are recorded (0 for a fresh document).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from functools import partial
from statistics import fmean
from typing import Any

import httpx

from clients.bench_passkey import spec_for_length
from clients.eval import continuation, distant_copy, fact_recall
from clients.eval.documents import Case, CountTokens, Probed
from clients.eval.results import Score
from clients.eval.server_meter import ServerMeter

GENERATION_TASKS = (*fact_recall.STYLES, continuation.TASK)
TASKS = (*GENERATION_TASKS, distant_copy.TASK)
# Room for the probe after the document (a cue is 10-20 tokens, a question ~40) and its separator.
PROBE_TOKENS = 48
# Probes (facts, sentences) per document: one per this many tokens, between these bounds (a long
# document holds as many facts as an 8k one, so a cell's facts interfere alike at every length).
TOKENS_PER_PROBE = 400
MIN_PER_DOCUMENT = 4
MAX_PER_DOCUMENT = 20
# distant_copy: copies per document, one per this many tokens, between these bounds.
TOKENS_PER_COPY = 500
COPIES = (2, 16)

CasesOf = Callable[[int, CountTokens, int, int, int], Probed]


def layout(length: int, probes: int) -> tuple[int, int]:
    """(probes per document, documents) for a cell of `probes` probes: a short document holds a
    few facts, so short cells ask several documents.

    >>> layout(1000, 20), layout(4000, 20), layout(8000, 20), layout(32000, 40), layout(1000, 2)
    ((4, 5), (10, 2), (20, 1), (20, 2), (2, 1))
    """
    per_document = min(probes, MAX_PER_DOCUMENT, max(MIN_PER_DOCUMENT, length // TOKENS_PER_PROBE))
    return per_document, math.ceil(probes / per_document)


def _generation_task(task: str) -> tuple[CasesOf, int, bool]:
    """The task's case builder, its max_new_tokens, and whether it is also asked without the
    document (its from-memory baseline)."""
    if task in fact_recall.STYLES:
        return partial(fact_recall.cases, style=fact_recall.STYLES[task]), fact_recall.MAX_NEW_TOKENS, False
    if task == continuation.TASK:
        return continuation.cases, continuation.MAX_NEW_TOKENS, True
    raise ValueError(f"unknown generation task {task!r}")


def _generate(client: httpx.Client, body: dict[str, Any]) -> tuple[int, dict[str, Any], float]:
    started = time.perf_counter()
    reply = client.post("/generate", json=body)
    try:
        data = reply.json()
    except ValueError:
        data = {"error": reply.text[:300]}
    return reply.status_code, data, time.perf_counter() - started


def _chosen(strategy: dict[str, Any]) -> str:
    """The strategy that ran: `auto`'s pick, or the strategy itself."""
    return str(strategy.get("chosen", strategy).get("name", "?"))


class Refused(Exception):
    """The server refused a request of the cell (the strategy cannot serve this length)."""


def _ask(client: httpx.Client, body: dict[str, Any]) -> tuple[dict[str, Any], float]:
    status, reply, seconds = _generate(client, body)
    if status != 200:
        raise Refused(f"{status}: {reply.get('error', reply)}"[:300])
    return reply, seconds


def _trial(
    client: httpx.Client, meter: ServerMeter, body: dict[str, Any], case: Case, first: bool, with_baseline: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One probe after its document: its record, and the strategy the reply reports."""
    before = meter.read() if first else None
    reply, seconds = _ask(client, body)
    generated = str(reply.get("generated_text", ""))
    served = reply.get("strategy", {})
    record: dict[str, Any] = {"score": case.score(generated), "seconds": round(seconds, 2), "expected": case.expected,
                              "output": generated[:80], "strategy": _chosen(served)}  # fmt: skip
    if before is not None:  # a document's first probe: was any of it in the prefix cache already?
        record["first_probe_cache"] = meter.read().since(before)
    if with_baseline:  # the same probe without the document: what the model knows from memory
        alone, _ = _ask(client, {**body, "context": None, "strategy": {"name": "native"}})
        record["baseline"] = case.score(str(alone.get("generated_text", "")))
    return record, served


def generation_cell(
    client: httpx.Client,
    meter: ServerMeter,
    task: str,
    spec: dict[str, Any],
    length: int,
    native: int,
    probes: int,
    count: CountTokens,
    seed: int,
) -> Score:
    """`probes` probes at spread depths of fresh documents whose prompts are about `length` tokens."""
    cases_of, max_new, with_baseline = _generation_task(task)
    used = spec_for_length(spec, length, native)
    score = Score(strategy=used, continuous=task == continuation.TASK)
    per_document, documents = layout(length, probes)
    start = meter.read()
    try:
        for index in range(documents * 2):  # a document may offer fewer probes (continuation): ask more
            if score.trials >= probes:
                break
            wanted = min(per_document, probes - score.trials)
            probed = cases_of(length - max_new - PROBE_TOKENS, count, wanted, seed, index)
            doc_tokens = max(count(probed.text), 1)
            for k, case in enumerate(probed.cases):
                body = {"inputs": case.inputs, "context": probed.text, "strategy": used,
                        "parameters": {"max_new_tokens": max_new, "do_sample": False}}  # fmt: skip
                if "dry_run" not in score.served:  # what the server would run, `auto`'s pick and reason
                    score.served["dry_run"] = _ask(client, {**body, "dry_run": True})[0].get("strategy", {})
                record, served = _trial(client, meter, body, case, k == 0, with_baseline)
                score.served.setdefault("reply", served)
                score.records.append({"doc": index, "source": probed.source,
                                      "depth": round(case.position / doc_tokens, 3),
                                      "distance": doc_tokens - case.position, **record})  # fmt: skip
                score.trials += 1
                score.correct += record["score"]
    except Refused as refusal:
        return Score(strategy=used, refused=str(refusal), served=score.served)
    score.cost = meter.read().since(start)
    score.seconds = fmean(r["seconds"] for r in score.records) if score.records else 0.0
    baselines = [r["baseline"] for r in score.records if "baseline" in r]
    score.baseline = round(fmean(baselines), 4) if baselines else None
    return score


def copy_cell(
    client: httpx.Client,
    meter: ServerMeter,
    spec: dict[str, Any],
    length: int,
    native: int,
    copies: int,
    encode: distant_copy.Encode,
    seed: int,
) -> Score:
    """distant_copy: documents of about `length` tokens until `copies` copies were scored."""
    most = min(max(COPIES[0], length // TOKENS_PER_COPY), COPIES[1], copies)
    documents = math.ceil(copies / most)
    per_document = math.ceil(copies / documents)
    used = spec_for_length(spec, length + 1, native)
    score = Score(strategy=used, continuous=True)
    start = meter.read()
    controls: list[float] = []
    seconds: list[float] = []
    for index in range(documents):
        ids, segments, source = distant_copy.build(length, encode, per_document, seed, index)
        scored, refused, served, took = distant_copy.score_prompt(client, used, ids, segments)
        if scored is None:
            score.refused = refused
            return score
        score.served.setdefault("reply", served)
        seconds.append(took)
        for seg in scored:
            if seg["kind"] == "control":
                controls.append(seg["score"])
                continue
            score.records.append({"doc": index, "source": source, "seconds": round(took, 2), "strategy": _chosen(served),
                                  **seg})  # fmt: skip
            score.trials += 1
            score.correct += seg["score"]
    score.cost = meter.read().since(start)
    score.seconds = fmean(seconds) if seconds else 0.0
    score.baseline = round(fmean(controls), 4) if controls else None
    return score
