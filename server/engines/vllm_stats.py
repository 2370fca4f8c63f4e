"""What vLLM measures per iteration, passed on as the engine API's `EngineIteration`.

vLLM hands its `SchedulerStats` and `IterationStats` to the stat loggers it is started with;
ours (`IterationRecorder.vllm_logger`) keeps the scheduler's latest figures for `Engine.stats()`
and tells the engine's stats listener (the metrics room), which never sees vLLM's types.
"""

from __future__ import annotations

import logging
from typing import Any

from server.engines.base import Engine, EngineIteration, FinishedRow, StatsListener, StepWork
from server.engines.vllm_adapter import stats

log = logging.getLogger(__name__)


def iteration_from_vllm(scheduler_stats: Any, iteration_stats: Any) -> EngineIteration:
    """vLLM's per-iteration `SchedulerStats` and `IterationStats` (either may be None) as the
    engine API's `EngineIteration`."""
    finished = stats.finished_rows(iteration_stats, FinishedRow) if iteration_stats is not None else ()
    preempted = stats.preempted_rows(iteration_stats) if iteration_stats is not None else 0
    if scheduler_stats is None:
        return EngineIteration(preempted_rows=preempted, finished=finished)
    scheduler = stats.scheduler_figures(scheduler_stats)
    return EngineIteration(
        kv_cache_usage=scheduler.kv_cache_usage,
        running_requests=scheduler.running_requests,
        waiting_requests=scheduler.waiting_requests,
        preempted_rows=preempted,
        finished=finished,
        step=step_from_vllm(stats.step_details(scheduler_stats)),
    )


def step_from_vllm(details: Any) -> StepWork | None:
    """vLLM's `SchedulerIterationDetails` as a `StepWork`; None without details, or for a
    data-parallel dummy step."""
    return stats.step_work(details, StepWork) if details is not None else None


class IterationRecorder:
    """Keeps the latest iteration that carried the scheduler's figures (`Engine.stats()` between
    scrapes) and tells the listener of every iteration."""

    def __init__(self, engine: Engine, listener: StatsListener | None) -> None:
        self.engine = engine
        self.listener = listener
        self.last = EngineIteration()

    def record(self, iteration: EngineIteration) -> None:
        """After every vLLM iteration, on the event loop."""
        if iteration.kv_cache_usage is not None:
            self.last = iteration
        if self.listener is not None:
            try:
                self.listener(self.engine, iteration)
            except Exception:  # a listener's bug must not break vLLM's output loop
                log.exception("engine stats listener failed")

    def vllm_logger(self) -> type:
        """A vLLM stat-logger class that records every iteration here."""
        from server.engines.vllm_adapter.engine import recording_stat_logger

        def record(scheduler_stats: Any, iteration_stats: Any) -> None:
            self.record(iteration_from_vllm(scheduler_stats, iteration_stats))

        return recording_stat_logger(record)
