"""distant_copy: how well the model reads a passage again after a distance (a scoring task, through
the prompt's own log-probabilities; perplexity of text that depends on distant context).

A passage of an Austen novel is followed by a tail of short segments: copies of PASSAGE_TOKENS-token
passages of the document taken at spread depths, each followed by a control segment of the same
size from another novel (text the prompt has not shown). A model that reads the original predicts
its copy's tokens; nothing predicts the control's but the model's knowledge of English (and of
Austen). Per segment, the fraction of its tokens the model ranks first (skipping the first SKIP,
where it cannot yet know which passage is copied) is recorded with the copy's distance to its
original. One `echo` request scores a whole document: the cell's score is the copies' mean, its
baseline the controls' mean, at the same positions of the same prompt.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from statistics import fmean
from typing import Any

import httpx

from clients.eval.documents import cell_rng, draw, spread

TASK = "distant_copy"
PASSAGE_TOKENS = 48
SKIP = 4
Encode = Callable[[str], list[int]]


@dataclass
class Segment:
    kind: str  # "copy" or "control"
    start: int  # its first token in the prompt
    original: int | None  # a copy's original's first token in the prompt


def build(tokens: int, encode: Encode, copies: int, seed: int, index: int) -> tuple[list[int], list[Segment], str]:
    """A prompt of about `tokens` token ids: the document, then `copies` copies interleaved with as
    many controls; the segments, and where the document comes from."""
    rng = cell_rng(TASK, tokens, seed, index)
    separator = encode("\n\n")
    tail = copies * 2 * (PASSAGE_TOKENS + len(separator))

    def count(text: str) -> int:
        return len(encode(text))

    doc = draw(tokens - tail, count, rng)
    doc_ids = encode(doc.text)
    title = doc.source.split(":")[0]
    controls: list[int] = []
    while len(controls) < copies * PASSAGE_TOKENS:  # a draw ends at a sentence: it may fall short
        controls += encode(draw(2 * copies * PASSAGE_TOKENS + 200, count, rng, avoid=title).text)
    ids, segments = list(doc_ids), []
    for k, depth in enumerate(spread(copies)):
        original = min(max(0, int(depth * len(doc_ids)) - PASSAGE_TOKENS // 2), len(doc_ids) - PASSAGE_TOKENS)
        for kind, span, origin in (
            ("copy", doc_ids[original : original + PASSAGE_TOKENS], original),
            ("control", controls[k * PASSAGE_TOKENS : (k + 1) * PASSAGE_TOKENS], None),
        ):
            ids += separator
            segments.append(Segment(kind, len(ids), origin))
            ids += span
    return ids, segments, doc.source


def ranked_first(token_logprobs: list[float | None], top_logprobs: list[dict[str, float] | None]) -> list[bool]:
    """Per prompt token: whether it was the model's likeliest (its logprob the best of the top)."""
    out = []
    for own, top in zip(token_logprobs, top_logprobs, strict=True):
        out.append(own is not None and top is not None and own >= max(top.values()) - 1e-6)
    return out


def segment_scores(segments: list[Segment], first: list[bool], logprobs: list[float | None]) -> list[dict[str, Any]]:
    """Each segment's top-1 fraction and mean logprob over its tokens after the first SKIP."""
    out = []
    for seg in segments:
        span = range(seg.start + SKIP, seg.start + PASSAGE_TOKENS)
        out.append(
            {
                "kind": seg.kind,
                "position": seg.start,
                "distance": None if seg.original is None else seg.start - seg.original,
                "score": round(fmean(first[i] for i in span), 4),
                "mean_logprob": round(fmean(float(logprobs[i] or 0.0) for i in span), 4),
            }
        )
    return out


def score_prompt(
    client: httpx.Client, spec: dict[str, Any], ids: list[int], segments: list[Segment]
) -> tuple[list[dict[str, Any]] | None, str | None, dict[str, Any], float]:
    """One echo request: the segments' scores, or the server's refusal; the strategy it reports;
    the seconds it took."""
    started = time.perf_counter()
    body = {"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 1, "strategy": spec, "temperature": 0}
    reply = client.post("/v1/completions", json=body)
    seconds = time.perf_counter() - started
    if reply.status_code != 200:
        try:
            why = str(reply.json().get("error", reply.text))
        except ValueError:
            why = reply.text
        return None, f"{reply.status_code}: {why}"[:300], {}, seconds
    answer = reply.json()
    logprobs = answer["choices"][0]["logprobs"]
    first = ranked_first(logprobs["token_logprobs"], logprobs["top_logprobs"])
    return segment_scores(segments, first, logprobs["token_logprobs"]), None, answer.get("strategy", {}), seconds
