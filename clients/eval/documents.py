"""Documents of varied natural text for the varied-text tasks: consecutive paragraphs of one of
Austen's novels (clients/eval/texts.py), sized in tokens, with sentences addressable by position.

A document is a list of pieces (sentences with the space or blank line that follows each), so a
task can insert a sentence at a sentence boundary at a given depth, or pick the sentence nearest a
depth. Each (task, length, seed, index) draws its own book and starting paragraph: a cell's text
is fresh (no other cell's document shares its first tokens, so none is in the prefix cache), and
every strategy of the grid reads the same cases.

    >>> doc = Document.from_paragraphs(["It rained. The road was wet.", "Emma smiled."])
    >>> doc.text
    'It rained. The road was wet.\\n\\nEmma smiled.'
    >>> doc.insert(1, "A fact.").text
    'It rained. A fact. The road was wet.\\n\\nEmma smiled.'
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

CountTokens = Callable[[str], int]


@dataclass
class Case:
    """One probe of a generation task: what is asked after the document and how the answer scores."""

    inputs: str
    expected: str
    depth: float  # where its fact or sentence sits, 0 = the document's start, 1 = its end
    position: int  # the same, in tokens from the document's start
    score: Callable[[str], float]


@dataclass
class Probed:
    """A document and the probes asked after it."""

    text: str
    source: str
    cases: list[Case]


# A sentence ends at . ! or ? (after an optional closing quote) followed by space and a capital or
# a quote; abbreviations such as "Mr." are protected below.
_SENTENCE_END = re.compile(r"(?<=[.!?])(?<!\bMr\.)(?<!\bMrs\.)(?<!\bDr\.)(?<!\bSt\.)[\"']?\s+(?=[\"'A-Z])")
# Paragraphs before this index are title pages and tables of contents.
FRONT_MATTER_PARAGRAPHS = 40


def reflow(text: str) -> list[str]:
    """A novel's paragraphs, each on one line (the package wraps lines at ~70 characters).

    >>> reflow("CHAPTER I\\n\\nIt is a truth\\nuniversally acknowledged.\\n\\n\\n")
    ['CHAPTER I', 'It is a truth universally acknowledged.']
    """
    out = []
    for block in re.split(r"\n\s*\n", text):
        line = " ".join(block.split())
        if line:
            out.append(line)
    return out


def split_sentences(paragraph: str) -> list[str]:
    """A paragraph's sentences.

    >>> split_sentences('Mr. Knightley came. "Is it so?" said Emma. She laughed.')
    ['Mr. Knightley came.', '"Is it so?" said Emma.', 'She laughed.']
    """
    parts, start = [], 0
    for match in _SENTENCE_END.finditer(paragraph):
        end = match.start() + len(match.group(0).rstrip())
        parts.append(paragraph[start:end].strip())
        start = match.end()
    parts.append(paragraph[start:].strip())
    return [p for p in parts if p]


@dataclass
class Document:
    """Sentences and the separators after them; `text` is their concatenation."""

    sentences: list[str] = field(default_factory=list)
    separators: list[str] = field(default_factory=list)  # " " inside a paragraph, "\n\n" after one
    source: str = ""  # "book:paragraph" where it starts

    @classmethod
    def from_paragraphs(cls, paragraphs: list[str], source: str = "") -> Document:
        doc = cls(source=source)
        for paragraph in paragraphs:
            for sentence in split_sentences(paragraph):
                doc.sentences.append(sentence)
                doc.separators.append(" ")
            if doc.separators:
                doc.separators[-1] = "\n\n"
        return doc

    @property
    def text(self) -> str:
        return "".join(s + sep for s, sep in zip(self.sentences, self.separators, strict=True)).rstrip()

    def starts(self) -> list[int]:
        """Each sentence's first character in `text`."""
        out, at = [], 0
        for sentence, separator in zip(self.sentences, self.separators, strict=True):
            out.append(at)
            at += len(sentence) + len(separator)
        return out

    def prefix(self, index: int) -> str:
        """The text before sentence `index`."""
        return "".join(s + sep for s, sep in zip(self.sentences[:index], self.separators[:index], strict=True))

    def insert(self, index: int, sentence: str) -> Document:
        """A sentence inserted before sentence `index`, in the same paragraph as it."""
        self.sentences.insert(index, sentence)
        self.separators.insert(index, " ")
        return self

    def truncated(self, count: int) -> Document:
        return Document(self.sentences[:count], self.separators[:count], self.source)


@lru_cache(maxsize=1)
def _corpus() -> dict[str, list[str]]:
    from clients.eval.texts import austen_books

    return {title: reflow(text) for title, text in sorted(austen_books().items())}


def cell_rng(*key: object) -> random.Random:
    """The random source of one document of one cell: the same for every strategy."""
    return random.Random(":".join(str(k) for k in key))


def draw(
    tokens: int,
    count: CountTokens,
    rng: random.Random,
    corpus: dict[str, list[str]] | None = None,
    avoid: str | None = None,
) -> Document:
    """About `tokens` tokens (never more) of consecutive paragraphs from a random place of a
    random novel (not `avoid`)."""
    books = corpus if corpus is not None else _corpus()
    title = rng.choice([t for t in books if t != avoid] or list(books))
    paragraphs = books[title]
    # A paragraph is ~100 tokens on average: start far enough from the end to fill the document.
    last_start = max(FRONT_MATTER_PARAGRAPHS, len(paragraphs) - tokens // 20 - 1)
    start = rng.randrange(min(FRONT_MATTER_PARAGRAPHS, last_start), last_start + 1)
    taken, used = [], 0
    for paragraph in paragraphs[start:]:
        taken.append(paragraph)
        used += count(paragraph)
        if used >= tokens * 1.05 + 100:  # more than enough: `fit` trims to the length
            break
    return fit(Document.from_paragraphs(taken, f"{title}:{start}"), tokens, count)


def fit(doc: Document, tokens: int, count: CountTokens) -> Document:
    """The longest run of the document's first sentences within `tokens` tokens."""
    low, high = 0, len(doc.sentences)
    while low < high:  # the largest count whose text fits
        mid = (low + high + 1) // 2
        if count(doc.truncated(mid).text) <= tokens:
            low = mid
        else:
            high = mid - 1
    return doc.truncated(low)


def boundary_at(doc: Document, depth: float, count: CountTokens, taken: set[int] | None = None) -> int:
    """The sentence index nearest `depth` (0 = the start, 1 = the end) by tokens, not in `taken`
    (index 0 is never chosen: something of the document comes before every insertion)."""
    total = max(count(doc.text), 1)
    target = depth * total
    free = [i for i in range(1, len(doc.sentences)) if not taken or i not in taken]
    if not free:
        raise ValueError("the document has no free sentence boundary left")
    # Token positions of the boundaries, estimated by characters (exact counts are per probe).
    chars, starts = len(doc.text) or 1, doc.starts()
    return min(free, key=lambda i: abs(starts[i] / chars * total - target))


def spread(count: int) -> list[float]:
    """`count` depths spread over the document, as the passkey task spreads its keys.

    >>> spread(4)
    [0.125, 0.375, 0.625, 0.875]
    """
    return [(i + 0.5) / count for i in range(count)]
