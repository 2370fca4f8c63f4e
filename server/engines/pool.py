"""Engines by RoPE configuration: started lazily on first use, evicted least-recently-used.

One engine per distinct RoPE configuration is the simplest way to serve several scalings from
one server with an engine whose RoPE is fixed at start-up. `EngineProvider` (engines/base.py) is
the seam where a single engine serving several configurations can replace this pool later.

Guarantees:
- an engine is handed out only once it has started (requests never see a half-started engine);
- concurrent first requests for one configuration wait on one start;
- at most `max_engines` engines (started or starting), and their estimated memory at most
  `memory_budget_gib`; to make room the least-recently-used idle, unpinned engine is stopped;
  when nothing can be stopped the request gets EnginePoolFull (HTTP 429);
- prestarted configurations are pinned (never evicted).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from server.engines.base import Engine
from strategies.base import ModelFacts, RopeConfig

log = logging.getLogger(__name__)

EngineFactory = Callable[[RopeConfig], Engine]
# Estimated resident memory of one engine under a configuration, GiB.
EngineCost = Callable[[RopeConfig], float]


class EnginePoolFull(RuntimeError):
    """Every engine slot is busy; the request may be retried later (HTTP 429)."""


@dataclass(frozen=True)
class PoolEntry:
    key: str
    state: str  # "running" | "starting"
    in_use: int
    pinned: bool
    cost_gib: float
    startup_seconds: float | None


class EnginePool:
    def __init__(
        self,
        model: ModelFacts,
        factory: EngineFactory,
        max_engines: int = 2,
        prestart: tuple[RopeConfig, ...] = (RopeConfig.native(),),
        on_change: Callable[[EnginePool], None] | None = None,
        memory_budget_gib: float | None = None,
        engine_cost: EngineCost | None = None,
    ) -> None:
        if max_engines < 1:
            raise ValueError("max_engines must be >= 1")
        self.model = model
        self._factory = factory
        self.max_engines = max_engines
        self.memory_budget_gib = memory_budget_gib
        self._cost = engine_cost or (lambda rope: 0.0)
        self._prestart = tuple(dict.fromkeys(prestart))
        self._pinned = {rope.key() for rope in self._prestart}
        if len(self._pinned) > max_engines:
            raise ValueError(f"{len(self._pinned)} prestarted configurations but max_engines={max_engines}")
        self._engines: dict[str, Engine] = {}
        self._starting: dict[str, asyncio.Future[Engine]] = {}
        self._costs: dict[str, float] = {}
        self._in_use: dict[str, int] = {}
        self._waiting: dict[str, int] = {}
        self._lock = asyncio.Lock()
        self._on_change = on_change
        self.starts = 0  # engines started over the pool's life (tests, metrics)

    async def start(self) -> None:
        """Start the prestart configurations (one after the other: each start is CPU-heavy)."""
        for rope in self._prestart:
            await self.engine_for(rope)

    def engines(self) -> list[Engine]:
        return list(self._engines.values())

    def entries(self) -> list[PoolEntry]:
        rows = []
        for key, engine in self._engines.items():
            rows.append(PoolEntry(key, "running", self._in_use.get(key, 0), key in self._pinned,
                                  self._costs.get(key, 0.0), getattr(engine, "startup_seconds", None)))
        for key in self._starting:
            rows.append(PoolEntry(key, "starting", 0, key in self._pinned, self._costs.get(key, 0.0), None))
        return rows

    def describe(self) -> dict[str, Any]:
        return {
            "max_engines": self.max_engines,
            "memory_budget_gib": self.memory_budget_gib,
            "engines": [e.__dict__ for e in self.entries()],
        }

    def acquire(self, engine: Engine) -> None:
        key = engine.rope.key()
        self._in_use[key] = self._in_use.get(key, 0) + 1

    def release(self, engine: Engine) -> None:
        key = engine.rope.key()
        self._in_use[key] = max(0, self._in_use.get(key, 0) - 1)
        if hasattr(engine, "last_used"):
            engine.last_used = time.monotonic()  # type: ignore[misc]

    async def engine_for(self, rope: RopeConfig) -> Engine:
        """The running engine for `rope`, starting it (once) if needed."""
        key = rope.key()
        engine = self._engines.get(key)
        if engine is not None:
            return engine
        # Counted as waiting from here on, so eviction leaves an engine alone that a request is
        # about to use (between its start and the request's acquire()).
        self._waiting[key] = self._waiting.get(key, 0) + 1
        try:
            async with self._lock:
                engine = self._engines.get(key)
                if engine is not None:
                    return engine
                pending = self._starting.get(key)
                if pending is None:
                    cost = float(self._cost(rope))
                    await self._make_room(cost)
                    pending = asyncio.get_running_loop().create_future()
                    self._starting[key] = pending
                    self._costs[key] = cost
                    asyncio.create_task(self._start_engine(rope, pending))
            # Concurrent first requests for one configuration all wait on the same start.
            return await asyncio.shield(pending)
        finally:
            self._waiting[key] -= 1
            if not self._waiting[key]:
                del self._waiting[key]

    async def _start_engine(self, rope: RopeConfig, done: asyncio.Future[Engine]) -> None:
        key = rope.key()
        try:
            engine = self._factory(rope)
            # Engine start-up blocks for tens of seconds; keep the event loop serving meanwhile.
            await asyncio.to_thread(engine.start)  # type: ignore[attr-defined]
        except Exception as exc:
            log.exception("engine %s failed to start", key)
            self._starting.pop(key, None)
            self._costs.pop(key, None)
            done.set_exception(exc)
            done.exception()  # mark retrieved: waiters (if any) re-raise it themselves
            return
        if hasattr(engine, "last_used"):
            engine.last_used = time.monotonic()  # type: ignore[misc]
        self.starts += 1
        self._engines[key] = engine
        self._starting.pop(key, None)
        done.set_result(engine)
        if self._on_change:
            self._on_change(self)

    def _used_gib(self) -> float:
        return sum(self._costs.get(k, 0.0) for k in (*self._engines, *self._starting))

    def _over(self, cost: float) -> bool:
        if len(self._engines) + len(self._starting) + 1 > self.max_engines:
            return True
        return self.memory_budget_gib is not None and self._used_gib() + cost > self.memory_budget_gib

    async def _make_room(self, cost: float) -> None:
        if self.memory_budget_gib is not None and cost > self.memory_budget_gib:
            raise EnginePoolFull(
                f"one engine needs about {cost:.1f} GiB, more than the pool's budget of {self.memory_budget_gib:g} GiB"
            )
        while self._over(cost):
            idle = [
                e for k, e in self._engines.items()
                if not self._in_use.get(k) and not self._waiting.get(k) and k not in self._pinned
            ]
            if not idle:
                raise EnginePoolFull(
                    f"all {self.max_engines} engine slots (memory budget "
                    f"{self.memory_budget_gib if self.memory_budget_gib is not None else 'unlimited'} GiB) "
                    "are busy with other RoPE configurations; retry later"
                )
            victim = min(idle, key=lambda e: getattr(e, "last_used", 0.0))
            key = victim.rope.key()
            log.info("evicting idle engine %s", key)
            self._engines.pop(key, None)
            self._costs.pop(key, None)
            await asyncio.to_thread(victim.shutdown)
            if self._on_change:
                self._on_change(self)

    def shutdown(self) -> None:
        for engine in list(self._engines.values()):
            try:
                engine.shutdown()
            except Exception:
                log.exception("engine %s did not shut down cleanly", engine.rope.key())
        self._engines.clear()
        self._costs.clear()
