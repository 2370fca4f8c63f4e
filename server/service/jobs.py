"""A prepared request (`Job`) and its deadline (refusals before it starts: server/service/refusal.py)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from server.engines.base import ExecutionPlan, SamplingOptions, StepStream
from strategies.base import Strategy, StrategyRequest


class DeadlineExceeded(RuntimeError):
    """The request's deadline passed; its engine work was aborted (HTTP 408)."""


@dataclass
class Job:
    request_id: str
    strategy: Strategy[Any]
    plan: ExecutionPlan
    sampling: SamplingOptions
    arrived: float
    # What the strategy planned from (its `plain_prompt()` is the text the model reads).
    request: StrategyRequest
    stats: dict[str, Any] = field(default_factory=dict)
    # Seconds from arrival after which the request is aborted (None: no deadline).
    deadline_s: float | None = None
    # Scheduling priority of every row (vLLM's: lower is earlier); the client's or the server's default.
    priority: int = 0

    @property
    def strategy_name(self) -> str:
        return self.strategy.name

    @property
    def deadline_at(self) -> float | None:
        """The deadline as a perf_counter time (None: none)."""
        return None if self.deadline_s is None else self.arrived + self.deadline_s

    @property
    def kv_tokens_needed(self) -> int:
        """KV-cache tokens the job holds at its end: every row's prompt and its generated tokens."""
        return self.plan.prompt_tokens + len(self.plan.rows) * self.sampling.max_new_tokens

    def describe(self) -> dict[str, Any]:
        return dict(self.plan.resolved)


async def within_deadline(steps: StepStream, deadline_at: float | None) -> StepStream:
    """`steps` until `deadline_at` (perf_counter time); then the pending step is cancelled, which
    aborts the engine rows (the engine's streams abort their rows when cancelled or closed)."""
    try:
        while True:
            remaining = None if deadline_at is None else deadline_at - time.perf_counter()
            try:
                if remaining is not None and remaining <= 0:
                    raise TimeoutError
                step = await asyncio.wait_for(anext(steps), remaining)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise DeadlineExceeded(
                    "deadline_s: the request's deadline passed; its engine work was aborted"
                ) from None
            yield step
    finally:
        await steps.aclose()
