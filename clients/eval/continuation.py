"""continuation: verbatim recall of a passage the document states once.

Sentences of at least CUE_WORDS + TARGET_WORDS words are picked at spread depths of a passage of
an Austen novel; the probe, after the document, is the sentence's first CUE_WORDS words, and the
model continues it (greedy). A trial scores the fraction of the sentence's next TARGET_WORDS words
the model reproduces before its first wrong word (a continuous score: one word early is 0.1, the
whole run 1.0). The cue occurs once in the document, so it points at one place. The novels are
public text a model may have read in training: the same cue is also asked without the document,
of `native` whatever the cell's strategy (`baseline`, what the model recalls from memory; `nbce`
cannot run without a document), and the cell reports both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial

from clients.eval.documents import Case, CountTokens, Document, Probed, cell_rng, draw, spread

TASK = "continuation"
CUE_WORDS = 8
TARGET_WORDS = 10
# Ten words of Austen are 12-16 tokens.
MAX_NEW_TOKENS = 20


@dataclass
class Passage:
    cue: str
    target: list[str]
    depth: float


def words(text: str) -> list[str]:
    """Lower-case words without punctuation, for comparing.

    >>> words('"Poor Miss Taylor!--I wish she were here')
    ['poor', 'miss', 'taylor', 'i', 'wish', 'she', 'were', 'here']
    """
    return re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower())


def passages(doc: Document, how_many: int) -> list[tuple[Passage, int]]:
    """Up to `how_many` sentences (their index in `doc`) nearest the spread depths whose cue occurs
    once in the document."""
    text = doc.text
    chars, starts = len(text) or 1, doc.starts()
    eligible = []
    for i, sentence in enumerate(doc.sentences):
        parts = sentence.split()
        if len(words(sentence)) < CUE_WORDS + TARGET_WORDS or len(parts) < CUE_WORDS + TARGET_WORDS:
            continue
        cue = " ".join(parts[:CUE_WORDS])
        if text.count(cue) == 1:
            eligible.append((starts[i] / chars, i, cue, parts[CUE_WORDS:]))
    chosen: list[tuple[Passage, int]] = []
    for depth in spread(how_many):
        free = [e for e in eligible if all(e[1] != index for _, index in chosen)]
        if not free:
            break
        at, index, cue, rest = min(free, key=lambda e: abs(e[0] - depth))
        chosen.append((Passage(cue, words(" ".join(rest))[:TARGET_WORDS], round(at, 3)), index))
    return chosen


def cases(tokens: int, count: CountTokens, how_many: int, seed: int, index: int) -> Probed:
    """Document `index` of a cell: a passage of a novel and up to `how_many` probes, each with its
    sentence's position in tokens."""
    doc = draw(tokens, count, cell_rng(TASK, tokens, seed, index))
    return Probed(
        doc.text,
        doc.source,
        [
            Case(p.cue, " ".join(p.target), p.depth, count(doc.prefix(i)), partial(score, passage=p))
            for p, i in passages(doc, how_many)
        ],
    )


def score(generated: str, passage: Passage) -> float:
    """The fraction of the target words reproduced before the first wrong one.

    >>> p = Passage("", words("she had been a friend and companion such as few"), 0.5)
    >>> score(" she had been a friend and a", p), score(" She had been a friend and companion such as few possessed", p)
    (0.6, 1.0)
    """
    said = words(generated)
    matched = 0
    for expected, got in zip(passage.target, said, strict=False):
        if expected != got:
            break
        matched += 1
    return matched / len(passage.target)
