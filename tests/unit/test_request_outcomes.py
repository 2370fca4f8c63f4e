"""How a request that ends early is counted: each kind of failure has one `status` label of
`ropeserve_requests_total` (server/service/request_record.py), and the service counts a run that
raised it under that label. The engine is the fake one: what is checked is the counting."""

from __future__ import annotations

import asyncio
import doctest
import time

import pytest

from server.engines.base import EngineBusy, EngineDown, ExecutionPlan, RowRequest, SamplingOptions, StepStream
from server.ops.metrics import REQUEST_STATUSES, Metrics
from server.plan import RopeConfig
from server.service import request_record
from server.service.generation_service import GenerationService
from server.service.jobs import DeadlineExceeded, Job
from server.service.request_record import FAILURE_STATUSES, failure_status
from strategies.base import StrategyRequest
from strategies.registry import default_registry
from tests.support.fake_engine import ByteTokenizer, FakeEngine


class SlotsTaken(EngineBusy):
    """A narrower kind of busy: counted as its parent is."""


@pytest.mark.parametrize(
    ("failure", "status"),
    [
        (asyncio.CancelledError(), "cancelled"),
        (GeneratorExit(), "cancelled"),
        (EngineBusy("every RoPE slot is held"), "overloaded"),
        (SlotsTaken("every RoPE slot is held"), "overloaded"),
        (DeadlineExceeded("deadline_s: passed"), "timeout"),
        (EngineDown("the engine died"), "error"),
        (ValueError("a bug"), "error"),
    ],
)
def test_each_failure_has_its_status_label(failure: BaseException, status: str) -> None:
    assert failure_status(failure) == status


def test_the_docstring_example_says_what_it_prints() -> None:
    assert doctest.testmod(request_record).failed == 0


def test_every_failure_label_is_a_series_the_counter_exports() -> None:
    assert {status for _, status in FAILURE_STATUSES} <= set(REQUEST_STATUSES)


class FailingEngine(FakeEngine):
    """Raises `failure` where the first token would come."""

    def __init__(self, failure: BaseException) -> None:
        super().__init__()
        self.failure = failure

    async def generate(self, row: RowRequest) -> StepStream:
        raise self.failure
        yield  # an async generator, as the engine's streams are


def counted(metrics: Metrics, status: str) -> float:
    """The request counter's value as a scrape reads it."""
    value = metrics.registry.get_sample_value("ropeserve_requests_total", {"strategy": "native", "status": status})
    return 0.0 if value is None else value


@pytest.mark.parametrize(
    ("failure", "status"),
    [(EngineBusy("every RoPE slot is held"), "overloaded"), (RuntimeError("row failed"), "error")],
)
def test_the_service_counts_a_failed_run_under_its_label(failure: BaseException, status: str) -> None:
    metrics = Metrics()
    svc = GenerationService(FailingEngine(failure), default_registry(), ByteTokenizer(), metrics, "native", 4)
    plan = ExecutionPlan(RopeConfig.native(), [list(b"ab")], 64, {})
    sampling = SamplingOptions(max_new_tokens=4)
    job = Job("job", svc.resolve_strategy("native"), plan, sampling, time.perf_counter(), StrategyRequest("ab"))

    async def drain() -> None:
        async for _ in svc.run(job):
            pass

    with pytest.raises(type(failure)):
        asyncio.run(drain())
    assert counted(metrics, status) == 1
    assert counted(metrics, "success") == 0
