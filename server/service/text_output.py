"""A stream of generated token ids as the text a client reads, and why it finishes.

vLLM detokenizes and cuts stop strings itself for a row it samples; a stream the service builds
from token ids (rows decoded in lockstep: server/service/lockstep.py) gets the same treatment
here, as vLLM and TGI give it:

- special tokens carry no text; a character split across tokens (UTF-8) waits for its last byte;
- a stop string ends the output wherever it falls, across token boundaries too, and neither it
  nor anything after it is sent; with several, the one that appears first in the text ends it;
- text that may be the start of a stop string is held back (its longest stop minus one
  characters) until the next token tells, so a stop string is never half sent;
- EOS ends the output (unless `ignore_eos`), as does `max_new_tokens` ("length").

    >>> from server.engines.base import SamplingOptions
    >>> class Letters:  # token t is the letter chr(ord("a") + t); none is special
    ...     eos_token_id, all_special_ids = None, []
    ...     def decode(self, ids, skip_special_tokens=False):
    ...         return "".join(chr(ord("a") + t) for t in ids)
    >>> out = OutputText(Letters(), (), SamplingOptions(max_new_tokens=8, stop=("cd",)), prompt_tokens=3)
    >>> [(s.text, s.finish_reason) for s in map(out.add, [0, 1, 2, 3])]  # "a" "b" "c" "d"
    [('', None), ('a', None), ('b', None), ('', 'stop_sequence')]
"""

from __future__ import annotations

from collections.abc import Iterable

from server.engines.base import EngineStep, FinishReason, SamplingOptions, TokenEvent, Tokenizer


class OutputText:
    """One output's tokens, added one at a time, as its steps: their text, and why it finishes."""

    def __init__(
        self, tokenizer: Tokenizer, eos_token_ids: Iterable[int], sampling: SamplingOptions, prompt_tokens: int
    ) -> None:
        self.tokenizer = tokenizer
        self.special = frozenset(tokenizer.all_special_ids or ())
        # The model's EOS tokens and the tokenizer's (they may differ: chat models end turns with either).
        self.eos = {*eos_token_ids, *_ids(tokenizer.eos_token_id)}
        self.ignore_eos = sampling.ignore_eos
        self.max_new = sampling.max_new_tokens
        self.stops = tuple(s for s in sampling.stop if s)
        self.held_back = max((len(s) for s in self.stops), default=1) - 1
        self.prompt_tokens = prompt_tokens
        self.ids: list[int] = []
        self.finish: FinishReason | None = None
        self._detok = IncrementalDetokenizer(tokenizer)
        self._pending = ""  # text of added tokens not sent yet

    def add(self, token: int) -> EngineStep:
        """The step of one more token (call no more once `finish` is set)."""
        self.ids.append(token)
        special = token in self.special
        self._pending += "" if special else self._detok.add(token)
        text = self._detok.emitted
        if self.stops and (hit := find_stop(text, self.stops, len(text) - len(self._pending))) is not None:
            # Drop the stop string and what follows it (characters past the stop's start).
            self._pending = self._pending[: max(0, len(self._pending) - (len(text) - hit))]
            self.finish = "stop_sequence"
        elif token in self.eos and not self.ignore_eos:
            self.finish = "eos_token"
        elif len(self.ids) >= self.max_new:
            self.finish = "length"
        sent = self._pending if self.finish is not None else self._pending[: len(self._pending) - self.held_back]
        self._pending = self._pending[len(sent) :]
        return EngineStep(
            tokens=[TokenEvent(id=token, text=self.tokenizer.decode([token]), logprob=None, special=special)],
            text=sent,
            finished=self.finish is not None,
            finish_reason=self.finish,
            prompt_tokens=self.prompt_tokens,
        )


def _ids(token_id: int | None) -> tuple[int, ...]:
    return () if token_id is None else (token_id,)


class IncrementalDetokenizer:
    """The text of a growing list of token ids, one token at a time (holds back incomplete UTF-8)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def add(self, token: int) -> str:
        """The text the token adds ("" while it ends in a partial character)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        # Decoding the whole sequence again keeps spacing exact; the earlier text never changes
        # except for a held-back partial character.
        common = 0
        for a, b in zip(self.emitted, text, strict=False):
            if a != b:
                break
            common += 1
        delta = text[common:]
        self.emitted = text
        return delta


def find_stop(text: str, stops: tuple[str, ...], new_from: int) -> int | None:
    """Start of the first stop string that ends in the new part of `text` (from `new_from` on), else None.

    >>> find_stop("hello world", ("o w", "xyz"), new_from=6)
    4
    """
    start = max(0, new_from - max(len(s) for s in stops))
    best = None
    for s in stops:
        i = text.find(s, start)
        if i != -1 and (best is None or i < best):
            best = i
    return best
