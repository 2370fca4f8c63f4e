"""Splitting a long document into row-sized chunks, on paragraph or sentence boundaries.

>>> split_document("One. Two.\n\nThree.", budget=3, tokenize=lambda t: t.split())
['One. Two.', 'Three.']
"""

from __future__ import annotations

import re

from strategies.base import DOCUMENT_SEPARATOR, Tokenize

# A chunk may end at a paragraph break once it holds this share of its budget.
PARAGRAPH_PREFERENCE = 0.8

_PARAGRAPH = re.compile(r"(?<=\n\n)")
_SENTENCE = re.compile(r"(?<=[.!?;:。！？])(?=\s)")
_WORD = re.compile(r"(?=\s)")


def _pieces(text: str) -> list[tuple[str, bool]]:
    """The text cut into paragraphs, then sentences, then words: (piece, ends a paragraph)."""
    out: list[tuple[str, bool]] = []
    for para in _PARAGRAPH.split(text):
        if not para:
            continue
        sentences = [s for s in _SENTENCE.split(para) if s]
        for i, sentence in enumerate(sentences):
            out.append((sentence, i == len(sentences) - 1))
    return out


def split_document(text: str, budget: int, tokenize: Tokenize) -> list[str]:
    """Split `text` into chunks of at most `budget` tokens (as counted piece by piece).

    Chunks end on a paragraph break when one lies in the last fifth of the chunk, else on a
    sentence end, else on a word boundary, else (one enormous word) on a token boundary.
    Concatenated, the chunks are the document (whitespace at the cuts aside).
    """
    pieces: list[tuple[str, int, bool]] = []
    for piece, para_end in _pieces(text):
        n = len(tokenize(piece))
        if n <= budget:
            pieces.append((piece, n, para_end))
            continue
        words = [w for w in _WORD.split(piece) if w]
        for j, word in enumerate(words):
            wn = len(tokenize(word))
            last = para_end and j == len(words) - 1
            if wn <= budget:
                pieces.append((word, wn, last))
                continue
            # A "word" longer than a chunk: cut it by characters into budget-sized parts.
            step = max(1, len(word) * budget // (wn + 1))
            parts = [word[i : i + step] for i in range(0, len(word), step)]
            for pi, part in enumerate(parts):
                pieces.append((part, len(tokenize(part)), last and pi == len(parts) - 1))

    chunks: list[str] = []
    current: list[tuple[str, int, bool]] = []
    used = 0
    for sized in pieces:
        if current and used + sized[1] > budget:
            cut = len(current)
            # Prefer the last paragraph end when it leaves the chunk well filled.
            acc = 0
            best = None
            for i, (_, n, para_end) in enumerate(current):
                acc += n
                if para_end and acc >= PARAGRAPH_PREFERENCE * budget:
                    best = i + 1
            if best is not None:
                cut = best
            chunks.append("".join(p for p, _, _ in current[:cut]))
            current = current[cut:]
            used = sum(n for _, n, _ in current)
        current.append(sized)
        used += sized[1]
    if current:
        chunks.append("".join(p for p, _, _ in current))
    chunks = [c.strip() for c in chunks]
    return [c for c in chunks if c]


def row_text(document: str, inputs: str) -> str:
    return document + DOCUMENT_SEPARATOR + inputs
