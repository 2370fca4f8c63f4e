"""vLLM's `RequestOutput`s as the engine API's `EngineStep`s: tokens, text, log-probabilities and
why a row finished."""

from __future__ import annotations

import asyncio
from typing import Any

from server.engines.base import EngineStep, FinishReason, RowRequest, TokenEvent, TopToken


class EngineAborted(RuntimeError):
    """vLLM ended a row for a reason the engine API has no name for (e.g. aborted)."""


def finish_reason(completion: Any) -> FinishReason | None:
    """Why vLLM finished `completion` (a `CompletionOutput`); None while it runs."""
    reason = completion.finish_reason
    if reason is None:
        return None
    if reason == "length":
        return "length"
    if reason == "stop" and isinstance(completion.stop_reason, str):
        return "stop_sequence"
    if reason == "stop":
        return "eos_token"
    raise EngineAborted(f"request ended with '{reason}'")


# Prompt logprobs of at least this many tokens are turned into steps off the event loop: each of
# their (1 + `logprobs`) entries per token is a Python object, 61,000 of them at 2,900 tokens.
PROMPT_LOGPROBS_IN_THREAD = 256


class OutputReader:
    """Turns one row's `RequestOutput`s (delta outputs: each holds the new tokens only) into steps."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.special_ids = frozenset(getattr(tokenizer, "all_special_ids", ()) or ())

    def step(self, output: Any, row: RowRequest) -> EngineStep:
        completion = output.outputs[0]
        return EngineStep(
            tokens=self.token_events(completion.token_ids, completion.logprobs),
            text=completion.text,
            finished=output.finished,
            finish_reason=finish_reason(completion) if output.finished else None,
            prompt_tokens=len(row.prompt_token_ids),
            # vLLM hands them over once, at the end of the prefill (later outputs carry an empty list).
            prompt_logprobs=(
                self.token_events(row.prompt_token_ids, output.prompt_logprobs) if output.prompt_logprobs else None
            ),
        )

    async def step_off_loop(self, output: Any, row: RowRequest) -> EngineStep:
        """`step`, in a worker thread when the output carries many prompt logprobs."""
        if output.prompt_logprobs and len(row.prompt_token_ids) >= PROMPT_LOGPROBS_IN_THREAD:
            return await asyncio.to_thread(self.step, output, row)
        return self.step(output, row)

    def token_events(self, token_ids: Any, logprobs: Any) -> list[TokenEvent]:
        """vLLM's token ids and their per-position {token id: Logprob} dicts (None where there is
        none) as TokenEvents; each dict holds the token itself and the likeliest alternatives."""
        logprobs = logprobs or []
        return [
            self._event(int(token_id), logprobs[i] if i < len(logprobs) else None)
            for i, token_id in enumerate(token_ids)
        ]

    def _event(self, token_id: int, ranked: Any) -> TokenEvent:
        entry = ranked.get(token_id) if ranked else None
        return TokenEvent(
            id=token_id,
            text=self._decoded(token_id, entry),
            logprob=float(entry.logprob) if entry is not None else None,
            special=token_id in self.special_ids,
            top=tuple(TopToken(int(t), self._decoded(t, lp), float(lp.logprob)) for t, lp in (ranked or {}).items()),
        )

    def _decoded(self, token_id: int, entry: Any) -> str:
        text = entry.decoded_token if entry is not None else None
        return str(text) if text is not None else str(self.tokenizer.decode([token_id]))
