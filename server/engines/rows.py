"""One engine row: what it asks for (`RowRequest`, `SamplingOptions`) and the steps it yields
(`EngineStep` of `TokenEvent`s). Part of the engine API (server/engines/base.py)."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from server.engines.output_constraint import OutputConstraint
from server.plan import FinishReason, RopeConfig


@dataclass(frozen=True)
class SamplingOptions:
    max_new_tokens: int
    greedy: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    ignore_eos: bool = False
    top_logprobs: int = 0
    # Log-probabilities of the prompt's tokens, with this many alternatives each (None: not asked).
    prompt_logprobs: int | None = None
    # Opaque per-request data for engine-side processors (e.g. NBCE's row group).
    extra_args: dict[str, Any] | None = None
    # What the output must match (structured output); None: free text.
    constraint: OutputConstraint | None = None


@dataclass(frozen=True)
class RowRequest:
    """One engine row: a prompt, how to sample it, and the RoPE configuration it runs under.

    Rows of different configurations share the engine and its batch; the engine keeps their
    prefix-cache entries apart (their keys are rotated differently).
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingOptions
    rope: RopeConfig = RopeConfig()
    # Scheduling priority, as vLLM's: lower is scheduled earlier among waiting rows (ties by arrival).
    priority: int = 0


@dataclass(frozen=True)
class TopToken:
    """One of the likeliest tokens at a position, with its log-probability."""

    id: int
    text: str
    logprob: float


@dataclass(frozen=True)
class TokenEvent:
    """A generated (or, in `EngineStep.prompt_logprobs`, a prompt) token.

    `logprob` is None where there is none (logprobs not asked for; the first prompt token);
    `top` holds the token itself and the `top_logprobs` likeliest ones, as the engine ranks them."""

    id: int
    text: str
    logprob: float | None
    special: bool
    top: tuple[TopToken, ...] = ()


@dataclass
class EngineStep:
    """New tokens of one row since the previous step."""

    tokens: list[TokenEvent]
    text: str = ""
    finished: bool = False
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    # The prompt's tokens with their log-probabilities, once, when `prompt_logprobs` was asked for.
    prompt_logprobs: list[TokenEvent] | None = None


# A row's (or a combined request's) new tokens as they come; closing it aborts the engine rows.
StepStream = AsyncGenerator[EngineStep, None]
