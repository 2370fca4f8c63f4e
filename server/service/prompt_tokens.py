"""A request tokenized before it is planned: the token ids strategies read (strategies/tokens.py).

Everything a strategy might need is tokenized here, once, so that planning is a cheap function of
values: the plain prompt, the inputs alone, the separator and inputs that follow a document in a
row, and each document with where each of its tokens ends (a strategy may cut it).

    >>> class Letters:  # one token per character, no special tokens
    ...     all_special_ids: list[int] = []
    ...     def encode(self, text, add_special_tokens=True): return [ord(c) for c in text]
    >>> tokens = PromptTokenizer(Letters()).tokens("Hi?", ("Doc.",))
    >>> len(tokens.prompt), len(tokens.question), tokens.documents[0].ends
    (9, 5, (1, 2, 3, 4))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from server.engines.base import Tokenizer
from strategies.base import DOCUMENT_SEPARATOR, PromptTokens, TokenizedText


@dataclass(frozen=True)
class Encoding:
    """One text's ids with the tokenizer's special tokens, and where each ends in the text."""

    ids: list[int]
    ends: list[int]
    special: list[bool]

    def text_tokens(self, text: str) -> TokenizedText:
        """The ids of the text itself, special tokens left out."""
        kept = [i for i, special in enumerate(self.special) if not special]
        return TokenizedText(text, tuple(self.ids[i] for i in kept), tuple(self.ends[i] for i in kept))

    def leading_special(self) -> tuple[int, ...]:
        """The special tokens before the text (a BOS)."""
        count = next((i for i, special in enumerate(self.special) if not special), len(self.ids))
        return tuple(self.ids[:count])


def encode(tokenizer: Tokenizer, texts: list[str], add_special_tokens: bool) -> list[Encoding]:
    """Each text's ids and end offsets: a fast (Rust) Hugging Face tokenizer gives its offsets, for
    all the texts in one call; any other has them spread evenly over the text, which only moves
    where a document is cut."""
    if not texts:
        return []
    if getattr(tokenizer, "is_fast", False):
        call: Any = tokenizer
        out = call(
            texts, add_special_tokens=add_special_tokens, return_offsets_mapping=True, return_special_tokens_mask=True
        )
        return [
            Encoding(list(ids), _non_decreasing(offsets, len(text)), [bool(m) for m in mask])
            for text, ids, offsets, mask in zip(
                texts, out["input_ids"], out["offset_mapping"], out["special_tokens_mask"], strict=True
            )
        ]
    return [_spread(tokenizer, text, add_special_tokens) for text in texts]


def _non_decreasing(offsets: list[tuple[int, int]], length: int) -> list[int]:
    """The offsets' ends, non-decreasing and within the text, whatever a tokenizer reports."""
    ends, last = [], 0
    for _, end in offsets:
        last = max(last, min(int(end), length))
        ends.append(last)
    return ends


def _spread(tokenizer: Tokenizer, text: str, add_special_tokens: bool) -> Encoding:
    ids = list(tokenizer.encode(text, add_special_tokens=add_special_tokens))
    specials = set(tokenizer.all_special_ids) if add_special_tokens else set()
    special = [i in specials for i in ids]
    count = max(1, len(ids) - sum(special))
    ends, seen = [], 0
    for is_special in special:
        seen += not is_special
        ends.append(seen * len(text) // count)
    return Encoding(ids, ends, special)


class PromptTokenizer:
    """Tokenizes a request's texts for planning, with the served model's tokenizer."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def tokens(self, inputs: str, documents: tuple[str, ...] = (), prompt_ids: list[int] | None = None) -> PromptTokens:
        """The ids of a request: `inputs` and `documents`, or `prompt_ids` (the client's, which then
        are the inputs too: a token-id prompt has no documents)."""
        if prompt_ids is not None:
            return PromptTokens(tuple(prompt_ids), inputs=tuple(prompt_ids))
        [whole] = encode(self.tokenizer, [DOCUMENT_SEPARATOR.join((*documents, inputs))], add_special_tokens=True)
        if not documents:
            inputs_ids = whole.text_tokens(inputs).ids
            return PromptTokens(tuple(whole.ids), inputs_ids, special_prefix=whole.leading_special())
        pieces = [inputs, DOCUMENT_SEPARATOR + inputs, *documents]
        alone, question, *tokenized = (
            e.text_tokens(text) for e, text in zip(encode(self.tokenizer, pieces, False), pieces, strict=True)
        )
        # Each document's own prompt, tokenized as one text: a document's last characters and the
        # separator can make other tokens together than apart (trailing whitespace does).
        own = [DOCUMENT_SEPARATOR.join((d, inputs)) for d in documents] if len(documents) > 1 else []
        return PromptTokens(
            prompt=tuple(whole.ids),
            inputs=alone.ids,
            question=question.ids,
            documents=tuple(tokenized),
            special_prefix=whole.leading_special(),
            document_prompts=tuple(tuple(e.ids) for e in encode(self.tokenizer, own, add_special_tokens=True)),
        )

    def document(self, text: str) -> TokenizedText:
        """One text's ids (no special tokens) with their end offsets, as a document is tokenized."""
        [encoding] = encode(self.tokenizer, [text], add_special_tokens=False)
        return encoding.text_tokens(text)
