"""A generation's engine steps gathered into the full result a non-streaming reply is built from."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from server.engines.base import EngineStep, FinishReason, TokenEvent


@dataclass
class GenerationResult:
    text: str = ""
    tokens: list[TokenEvent] = field(default_factory=list)
    finish_reason: FinishReason = "length"
    prompt_tokens: int = 0
    prompt_logprobs: list[TokenEvent] | None = None

    def add(self, step: EngineStep) -> None:
        if step.prompt_logprobs is not None:
            self.prompt_logprobs = step.prompt_logprobs
        self.text += step.text
        self.tokens.extend(step.tokens)
        self.prompt_tokens = max(self.prompt_tokens, step.prompt_tokens)
        if step.finished and step.finish_reason is not None:
            self.finish_reason = step.finish_reason


async def collect(steps: AsyncIterator[EngineStep]) -> GenerationResult:
    result = GenerationResult()
    async for step in steps:
        result.add(step)
    return result
