"""The service runs a plan as its combiner's kind says, never by the strategy that planned it: a
`LockstepCombiner`'s rows are decoded in lockstep by the service (server/service/lockstep.py), a
`RowCombiner` runs itself. On the fake engine: what is checked is which path ran."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from server.engines.base import EngineStep, ExecutionPlan, LockstepRow, RowRequest, SamplingOptions, StepStream
from server.ops.metrics import Metrics
from server.plan import RopeConfig
from server.service.generation_service import GenerationService
from server.service.jobs import Job
from strategies.base import StrategyRequest
from strategies.registry import default_registry
from tests.support.fake_engine import ByteTokenizer, FakeEngine


class RecordingEngine(FakeEngine):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[RowRequest] = []

    async def generate(self, row: RowRequest) -> StepStream:
        self.rows.append(row)
        async for step in super().generate(row):
            yield step


@dataclass(frozen=True)
class TaggingCombiner:
    """A `LockstepCombiner` that tags each row with its index."""

    name: str = "tagging"

    def row_args(self, row: LockstepRow, sampling: SamplingOptions) -> dict[str, Any]:
        return {"row": row.row, "of": row.rows, "base": row.base}

    def prefill_args(self, sampling: SamplingOptions) -> dict[str, Any] | None:
        return {"prefill": True}


@dataclass(frozen=True)
class FirstRowOnly:
    """A `RowCombiner` that drives the engine itself: the first row alone."""

    name: str = "first_row_only"

    async def run(self, engine: Any, job: Any) -> StepStream:
        async for step in engine.generate(RowRequest(f"{job.request_id}:own", job.plan.rows[0], job.sampling)):
            yield step


def service(engine: FakeEngine) -> GenerationService:
    return GenerationService(engine, default_registry(), ByteTokenizer(), Metrics(), "native", 4)


def job(svc: GenerationService, combiner: Any) -> Job:
    rows = [list(b"ab"), list(b"ab"), list(b"ab")]
    plan = ExecutionPlan(RopeConfig.native(), rows, 64, {}, combiner=combiner)
    sampling = SamplingOptions(max_new_tokens=4)
    return Job("job", svc.resolve_strategy("native"), plan, sampling, time.perf_counter(), StrategyRequest("ab"))


async def steps(svc: GenerationService, j: Job) -> list[EngineStep]:
    return [step async for step in svc.run(j)]


async def test_a_lockstep_combiners_rows_are_decoded_in_lockstep_by_the_service() -> None:
    engine = RecordingEngine()
    svc = service(engine)
    served = await steps(svc, j := job(svc, TaggingCombiner()))
    assert "".join(s.text for s in served) == "abab" and served[-1].finish_reason == "length"
    prefills = [r for r in engine.rows if r.sampling.max_new_tokens == 1]
    group = [r for r in engine.rows if r.sampling.max_new_tokens > 1]
    assert [r.sampling.extra_args for r in prefills] == [{"prefill": True}] * 3
    assert [r.sampling.extra_args for r in group] == [{"row": k, "of": 3, "base": 0} for k in range(3)]
    assert j.stats["tagging_rows"] == 3 and j.stats["tagging_resubmits"] == 0


async def test_a_row_combiner_runs_itself() -> None:
    engine = RecordingEngine()
    svc = service(engine)
    served = await steps(svc, job(svc, FirstRowOnly()))
    assert "".join(s.text for s in served) == "abab"
    assert [r.request_id for r in engine.rows] == ["job:own"]
