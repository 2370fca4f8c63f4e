"""EnginePool without vLLM: fake engines that take a while to start."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from server.engines.pool import EnginePool, EnginePoolFull
from strategies.base import ModelFacts, RopeConfig

MODEL = ModelFacts("m", 8192, {"rope_type": "default", "rope_theta": 1e5}, 64, 100)


class FakeEngine:
    kind = "fake"
    starts = 0
    lock = threading.Lock()

    def __init__(self, rope: RopeConfig, start_s: float = 0.3) -> None:
        self.rope = rope
        self.model = MODEL
        self.start_s = start_s
        self.started = False
        self.stopped = False
        self.last_used = time.monotonic()
        self.startup_seconds = None

    def start(self) -> None:
        with FakeEngine.lock:
            FakeEngine.starts += 1
        time.sleep(self.start_s)
        self.started = True
        self.startup_seconds = self.start_s

    def shutdown(self) -> None:
        self.stopped = True


def rope(theta: float) -> RopeConfig:
    return RopeConfig.from_dict({"rope_type": "default", "rope_theta": theta}, 16384)


@pytest.fixture(autouse=True)
def _reset() -> None:
    FakeEngine.starts = 0


async def test_concurrent_first_requests_start_one_engine() -> None:
    made: list[FakeEngine] = []

    def factory(r: RopeConfig) -> FakeEngine:
        made.append(FakeEngine(r))
        return made[-1]

    pool = EnginePool(MODEL, factory, max_engines=2, prestart=())
    engines = await asyncio.gather(*(pool.engine_for(rope(2e5)) for _ in range(8)))
    assert len(made) == 1 and FakeEngine.starts == 1 and pool.starts == 1
    assert all(e is made[0] for e in engines)
    # Nobody got it before its start had finished.
    assert all(e.started for e in engines)


async def test_half_started_engine_is_not_listed_nor_handed_out() -> None:
    pool = EnginePool(MODEL, lambda r: FakeEngine(r, start_s=0.5), max_engines=2, prestart=())
    task = asyncio.create_task(pool.engine_for(rope(3e5)))
    await asyncio.sleep(0.1)
    assert pool.engines() == []
    assert [e.state for e in pool.entries()] == ["starting"]
    engine = await task
    assert engine.started and pool.engines() == [engine]


async def test_lru_eviction_pinning_and_full() -> None:
    pool = EnginePool(MODEL, lambda r: FakeEngine(r, 0.01), max_engines=2, prestart=(RopeConfig.native(),))
    await pool.start()
    a = await pool.engine_for(rope(2e5))
    pool.acquire(a)
    with pytest.raises(EnginePoolFull):  # native pinned, `a` busy
        await pool.engine_for(rope(4e5))
    pool.release(a)
    b = await pool.engine_for(rope(4e5))
    assert a.stopped and not b.stopped
    assert {e.rope.key() for e in pool.engines()} == {"native", rope(4e5).key()}


async def test_memory_budget() -> None:
    pool = EnginePool(
        MODEL, lambda r: FakeEngine(r, 0.01), max_engines=4, prestart=(RopeConfig.native(),),
        memory_budget_gib=7.0, engine_cost=lambda r: 3.5,
    )
    await pool.start()
    a = await pool.engine_for(rope(2e5))
    b = await pool.engine_for(rope(4e5))  # 3 x 3.5 > 7: evicts `a`
    assert a.stopped and len(pool.engines()) == 2 and b in pool.engines()
    small = EnginePool(MODEL, lambda r: FakeEngine(r, 0.01), max_engines=4, prestart=(),
                       memory_budget_gib=2.0, engine_cost=lambda r: 3.5)
    with pytest.raises(EnginePoolFull):
        await small.engine_for(rope(2e5))


async def test_failed_start_is_retried() -> None:
    calls = []

    def factory(r: RopeConfig) -> FakeEngine:
        calls.append(r)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return FakeEngine(r, 0.01)

    pool = EnginePool(MODEL, factory, max_engines=2, prestart=())
    with pytest.raises(RuntimeError):
        await pool.engine_for(rope(2e5))
    assert (await pool.engine_for(rope(2e5))).started


def test_prestart_resolved_from_settings() -> None:
    from server.bootstrap import prestart_configs
    from strategies.registry import default_registry

    configs = prestart_configs(["native", {"name": "ntk", "factor": 4}, "native"], default_registry(), MODEL)
    assert configs[0].is_native and len(configs) == 2
    assert configs[1].max_model_len == 32768
