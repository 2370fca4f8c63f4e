"""vLLM's per-iteration statistics (vllm.v1.metrics.stats, vLLM 0.32): the version-specific fields
the engine reads of `SchedulerStats`, `IterationStats`, `FinishedRequestStats` and
`SchedulerIterationDetails`, as plain values or through the constructors it is given (the engine
API's types, which this room does not import: server/engines/vllm_stats.py). Each field is listed in `PRIVATE_NAMES` and checked against the installed vLLM.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

Row = TypeVar("Row")
Step = TypeVar("Step")


class SchedulerFigures(NamedTuple):
    kv_cache_usage: float
    running_requests: int
    waiting_requests: int


def scheduler_figures(scheduler_stats: Any) -> SchedulerFigures:
    return SchedulerFigures(
        float(scheduler_stats.kv_cache_usage),
        int(scheduler_stats.num_running_reqs),
        int(scheduler_stats.num_waiting_reqs),
    )


def step_details(scheduler_stats: Any) -> Any:
    """The step's `SchedulerIterationDetails` (sent with `enable_logging_iteration_details`), or None."""
    return scheduler_stats.iteration_details


def preempted_rows(iteration_stats: Any) -> int:
    return int(iteration_stats.num_preempted_reqs)


def finished_rows(iteration_stats: Any, row: Callable[[str, float, float, int, int], Row]) -> tuple[Row, ...]:
    """Each finished row's `FinishedRequestStats` as `row(request_id, queued_s, prefill_s,
    prompt_tokens, cached_tokens)`. vLLM counts a row's prefix-cache hits
    (`num_cached_tokens`) when its prefill is scheduled; a row preempted and recomputed keeps the
    first count."""
    return tuple(
        row(
            str(f.request_id),
            max(0.0, float(f.queued_time)),
            max(0.0, float(f.prefill_time)),
            max(0, int(f.num_prompt_tokens or 0)),
            max(0, int(f.num_cached_tokens or 0)),
        )
        for f in iteration_stats.finished_requests
        if f.request_id is not None
    )


def step_work(details: Any, step: Callable[[int, int, float], Step]) -> Step | None:
    """`SchedulerIterationDetails` as `step(prefill_tokens, decode_tokens, seconds)`; None for a data-parallel dummy step
    (no work of ours). vLLM counts a request as "context" while it has no output token: its tokens
    in the step are prefill (a chunk of its prompt); the others' are decode tokens."""
    if details.is_dummy:
        return None
    return step(
        int(details.num_ctx_tokens),
        int(details.num_generation_tokens),
        max(0.0, float(details.elapsed_ms) / 1000),
    )
