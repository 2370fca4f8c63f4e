"""A request's token ids as strategies read them.

The service tokenizes a request before it is planned (server/service/prompt_tokens.py), so that
planning is cheap, needs no tokenizer, and can run on the event loop. A document comes with where
each of its tokens ends in its text, so that its ids can be cut where the text has a paragraph or
sentence end without tokenizing the pieces again.

    >>> doc = TokenizedText("One. Two.", ids=(10, 11, 12, 13), ends=(3, 4, 8, 9))
    >>> doc.text[doc.boundary(2):doc.boundary(4)], doc.span_text(range(0, 2))
    (' Two.', 'One.')
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TokenizedText:
    """A text's token ids (no special tokens) and, for each token, the character offset in `text`
    where it ends (non-decreasing; a token that shares a character with the next, as byte-level
    tokens of one character may, ends where that character does)."""

    text: str
    ids: tuple[int, ...] = ()
    ends: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.ends):
            raise ValueError(f"{len(self.ids)} token ids but {len(self.ends)} end offsets")

    def __len__(self) -> int:
        return len(self.ids)

    def boundary(self, i: int) -> int:
        """The character offset between token i - 1 and token i (0 before the first token)."""
        return self.ends[i - 1] if i > 0 else 0

    def span_text(self, span: range) -> str:
        """The text of tokens `span.start` .. `span.stop - 1`."""
        return self.text[self.boundary(span.start) : self.boundary(span.stop)]


@dataclass(frozen=True)
class PromptTokens:
    """The token ids of one request, as the served model's tokenizer gives them.

    `prompt`: the plain prompt (documents, blank line, inputs: docs/CONTRACT.md) as the model reads
    it, special tokens included; or the client's own ids. `inputs`: the inputs alone (a token-id
    prompt: the client's ids). `question`: DOCUMENT_SEPARATOR + inputs, what follows a document in
    a row that reads one document first (NBCE); empty without documents. `documents`: each document,
    with its text. `special_prefix`: the special tokens the tokenizer puts before a text (a BOS;
    none for many tokenizers), which a row assembled from pieces starts with. `document_prompts`:
    for two or more documents, each one's own plain prompt (the document, DOCUMENT_SEPARATOR, the
    inputs) as the model reads that text, special tokens included: the row of a strategy that reads
    each document alone before the inputs (one document's is `prompt`). Only `prompt` and
    `document_prompts` have special tokens.

    A request that is only a prompt's ids (a row another strategy planned) has the rest empty.
    """

    prompt: tuple[int, ...]
    inputs: tuple[int, ...] = ()
    question: tuple[int, ...] = ()
    documents: tuple[TokenizedText, ...] = ()
    special_prefix: tuple[int, ...] = ()
    document_prompts: tuple[tuple[int, ...], ...] = ()

    def alone(self) -> list[int]:
        """The row that reads the inputs alone, as the model reads a text."""
        return [*self.special_prefix, *self.inputs]

    def after(self, document: tuple[int, ...]) -> list[int]:
        """The row that reads `document` (ids), then the separator and the inputs."""
        return [*self.special_prefix, *document, *self.question]
