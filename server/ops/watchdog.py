"""The engine watchdog: a dead engine (its process killed or crashed) is replaced by a new one."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from server.engines.base import Engine
from server.ops.gc_heap import freeze_startup_heap

log = logging.getLogger("ropeserve.access")


class QueuedWork(Protocol):
    """What the watchdog clears of admission's tracked work when the engine is replaced."""

    def reset(self) -> None: ...


class WatchedService(Protocol):
    """What the watchdog reads and replaces (the service)."""

    engine: Engine
    restarting: bool

    @property
    def admission(self) -> QueuedWork: ...

    def refresh_gauges(self) -> None: ...


async def watch_engine(
    service: WatchedService,
    engine_factory: Callable[[], Awaitable[Engine]],
    interval_s: float = 1.0,
    max_backoff_s: float = 60.0,
) -> None:
    """Replace a dead engine, retrying with backoff; runs for the server's life (app.py).

    Meanwhile /health and new requests get 503 (`restarting`); requests in flight when it died
    got 503 from the engine's stream (EngineDown)."""
    while True:
        await asyncio.sleep(interval_s)
        if service.engine.alive:
            continue
        service.restarting = True
        log.error("the engine died; restarting it")
        try:
            await asyncio.to_thread(service.engine.shutdown)
        except Exception:  # a dead engine may not shut down cleanly; the new one starts anyway
            log.exception("shutting down the dead engine failed")
        service.engine = await _start_with_backoff(engine_factory, max_backoff_s)
        freeze_startup_heap()  # the new engine's objects, as the first one's (server/ops/gc_heap.py)
        # Nothing the dead engine held is queued in the new one.
        service.admission.reset()
        service.refresh_gauges()
        service.restarting = False
        log.info("engine restarted")


async def _start_with_backoff(engine_factory: Callable[[], Awaitable[Engine]], max_backoff_s: float) -> Engine:
    backoff = 1.0
    while True:
        try:
            return await engine_factory()
        except Exception:
            log.exception("engine restart failed; retrying in %.0f s", backoff)
            await asyncio.sleep(backoff)
            backoff = min(2 * backoff, max_backoff_s)
