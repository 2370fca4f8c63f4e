"""Cutting a long document's token ids into row-sized chunks, where its text has a paragraph or
sentence end.

A chunk is at most `budget` tokens. It ends at the last paragraph break in the last fifth of what
fits, else at the last sentence end (or paragraph break) that fits, else at the last word boundary,
else (one enormous word) at the last token boundary. Whitespace-only tokens at a cut belong to no
chunk, so the chunks read as the document's text stripped at the cuts. The cuts are decided from
the text at each token boundary (TokenizedText.ends); the ids are the document's own, so the
chunks and the document's ids agree token for token.

>>> from strategies.tokens import TokenizedText
>>> doc = TokenizedText("One. Two.\\n\\nThree.", ids=tuple(range(7)), ends=(3, 4, 8, 9, 11, 16, 17))
>>> spans = chunk_spans(doc, budget=5)
>>> spans, [doc.span_text(span) for span in spans]
([range(0, 4), range(5, 7)], ['One. Two.', 'Three.'])
"""

from __future__ import annotations

import math
from collections.abc import Callable

from strategies.tokens import TokenizedText

# A chunk may end at a paragraph break once it holds this share of its budget.
PARAGRAPH_PREFERENCE = 0.8
SENTENCE_ENDS = frozenset(".!?;:。！？")


def chunk_spans(doc: TokenizedText, budget: int) -> list[range]:
    """The chunks of `doc` as token index ranges, in order, each of at most `budget` tokens."""
    if budget < 1:
        raise ValueError(f"a chunk budget of {budget} tokens")
    spans: list[range] = []
    start = _skip_blank(doc, 0)
    while start < len(doc):
        stop = len(doc) if len(doc) - start <= budget else _cut(doc, start, budget)
        span = _stripped(doc, start, stop)
        if span:
            spans.append(span)
        start = _skip_blank(doc, stop)
    return spans


def _cut(doc: TokenizedText, start: int, budget: int) -> int:
    """Where the chunk that starts at token `start` ends (exclusive), by the preferences above."""
    limit = start + budget
    paragraph_from = start + max(1, math.ceil(PARAGRAPH_PREFERENCE * budget))
    preferences: tuple[tuple[int, Callable[[TokenizedText, int], bool]], ...] = (
        (paragraph_from, _paragraph_end),
        (start + 1, _sentence_end),
        (start + 1, _word_boundary),
        (start + 1, _between_characters),
    )
    for first, ends_here in preferences:
        for i in range(limit, first - 1, -1):
            if ends_here(doc, i):
                return i
    return limit


def _blank_around(doc: TokenizedText, i: int) -> tuple[int, int]:
    """The run of whitespace around the boundary before token i, as character offsets [a, b)."""
    text, at = doc.text, doc.boundary(i)
    a = at
    while a > 0 and text[a - 1].isspace():
        a -= 1
    b = at
    while b < len(text) and text[b].isspace():
        b += 1
    return a, b


def _paragraph_end(doc: TokenizedText, i: int) -> bool:
    a, b = _blank_around(doc, i)
    return doc.text.count("\n", a, b) >= 2


def _sentence_end(doc: TokenizedText, i: int) -> bool:
    a, b = _blank_around(doc, i)
    return (b > a and a > 0 and doc.text[a - 1] in SENTENCE_ENDS) or _paragraph_end(doc, i)


def _word_boundary(doc: TokenizedText, i: int) -> bool:
    a, b = _blank_around(doc, i)
    return b > a


def _between_characters(doc: TokenizedText, i: int) -> bool:
    """Not inside one character (byte-level tokens of one character end where it does)."""
    return doc.ends[i - 1] < doc.ends[i]


def _blank(doc: TokenizedText, i: int) -> bool:
    """Token i is whitespace only."""
    return doc.text[doc.boundary(i) : doc.ends[i]].isspace()


def _skip_blank(doc: TokenizedText, i: int) -> int:
    while i < len(doc) and _blank(doc, i):
        i += 1
    return i


def _stripped(doc: TokenizedText, start: int, stop: int) -> range:
    while stop > start and _blank(doc, stop - 1):
        stop -= 1
    return range(start, stop)
