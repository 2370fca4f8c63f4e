"""Structured output for NBCE: one grammar state per row group, applied to every row's logits before
the rows are combined (processor.py). Why there, and not after: docs/design/structured-output.md.

Every row of a group advances through the same tokens (the processor forces the combined token in
each), so one matcher serves the group: at each step it is brought up to the group's tokens — those
confirmed before this submission (the tail of each row's prompt, `RowTag.base` of them) and the
rows' output so far — and its mask of allowed next tokens is applied to every row. A resubmitted
group builds its matcher again from its confirmed tokens, so a desync never leaves the grammar
behind or ahead of the text.

Grammars are compiled with xgrammar as vLLM's backend compiles a single row's
(`compile_constraint`), in a background thread of the engine core, as soon as a row announces its
constraint (the prefill rows do, before the group is submitted), and cached per constraint; a step
that needs one not yet compiled waits for it. The API process compiled every constraint first, in
bounded time (server/engines/grammar_check.py), so none here fails or runs unbounded.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from server.engines.base import OutputConstraint, compile_constraint

log = logging.getLogger(__name__)

# Compiled grammars kept in the engine core (least recently used dropped first).
CACHED_GRAMMARS = 64


class GrammarCache:
    """Compiled grammars by constraint, compiled one at a time in a background thread."""

    def __init__(self, tokenizer_path: str, vocab_size: int, cached: int = CACHED_GRAMMARS) -> None:
        self.tokenizer_path = tokenizer_path
        self.vocab_size = vocab_size
        self.cached = cached
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nbce-grammar")
        self._compiler: Any = None
        self._compiled: OrderedDict[tuple[str, str], Future[Any]] = OrderedDict()

    def prepare(self, constraint: OutputConstraint) -> Future[Any]:
        """The constraint's compiled grammar, compiling in the background if it is new."""
        key = constraint.key()
        future = self._compiled.get(key)
        if future is None:
            future = self._compiled[key] = self._executor.submit(self._compile, constraint)
            while len(self._compiled) > self.cached:
                self._compiled.popitem(last=False)
        self._compiled.move_to_end(key)
        return future

    def _compile(self, constraint: OutputConstraint) -> Any:
        if self._compiler is None:
            self._compiler = _compiler(self.tokenizer_path, self.vocab_size)
        return compile_constraint(self._compiler, constraint)


def _compiler(tokenizer_path: str, vocab_size: int) -> Any:
    import xgrammar as xgr
    from transformers import AutoTokenizer

    info = xgr.TokenizerInfo.from_huggingface(AutoTokenizer.from_pretrained(tokenizer_path), vocab_size=vocab_size)
    return xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)


class GroupGrammar:
    """One row group's grammar state. `confirmed`: the tokens confirmed before the group was submitted."""

    def __init__(self, compiled: Future[Any], stop_token_ids: Sequence[int], confirmed: Sequence[int]) -> None:
        self._compiled = compiled
        self._stop_token_ids = list(stop_token_ids)
        self._confirmed = list(confirmed)
        self._matcher: Any = None
        self._consumed = 0  # tokens of confirmed + output the matcher has accepted
        self._bitmask: torch.Tensor | None = None

    def mask(self, logits: torch.Tensor, rows: Sequence[int], output: Sequence[int]) -> bool:
        """Disallow in `logits[rows]` every token the grammar does not allow next, after the confirmed
        tokens and `output` (the rows' output so far). False when those tokens are not the grammar's,
        or it allows none next (the group is then out of step: resubmitted)."""
        matcher = self._synced(output)
        if matcher is None:
            return False
        if matcher.is_terminated():
            return True  # the output is complete (its stop token accepted): nothing left to constrain
        allowed = self._allowed(matcher, logits.shape[1]).to(logits.device)
        if not bool(allowed.any()):
            # A dead end of the grammar (a rule that can never end): no token to combine. Out of step;
            # the runner's resubmissions are bounded and then fail the request.
            log.warning("nbce grammar: no token allowed after %d tokens", self._consumed)
            return False
        index = torch.as_tensor(list(rows), device=logits.device)
        logits[index] = logits[index].masked_fill(~allowed, float("-inf"))
        return True

    def _synced(self, output: Sequence[int]) -> Any:
        """The matcher after the group's tokens; None if one of them is not allowed."""
        if self._matcher is None:
            import xgrammar as xgr

            self._matcher = xgr.GrammarMatcher(
                self._compiled.result(), override_stop_tokens=self._stop_token_ids or None
            )
        history_length = len(self._confirmed) + len(output)
        if history_length < self._consumed:  # the rows' output cannot shrink; start over if it did
            self._matcher.reset()
            self._consumed = 0
        while self._consumed < history_length:
            at = self._consumed
            token = self._confirmed[at] if at < len(self._confirmed) else output[at - len(self._confirmed)]
            if self._matcher.is_terminated() or not self._matcher.accept_token(token):
                log.warning("nbce grammar: token %d at position %d is not the grammar's; resubmitting", token, at)
                return None
            self._consumed += 1
        return self._matcher

    def _allowed(self, matcher: Any, width: int) -> torch.Tensor:
        """The allowed next tokens as a boolean row of `width` (ids past the grammar's vocabulary: none)."""
        import xgrammar as xgr

        vocab = int(self._compiled.result().tokenizer_info.vocab_size)
        if self._bitmask is None:
            self._bitmask = xgr.allocate_token_bitmask(1, vocab)
        matcher.fill_next_token_bitmask(self._bitmask)
        bits = (self._bitmask[0].unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
        allowed = bits.flatten()[:vocab].bool()
        if vocab >= width:
            return allowed[:width]
        return torch.cat([allowed, torch.zeros(width - vocab, dtype=torch.bool)])
