"""Whether the server can start a job now: not draining, an engine up, room under the concurrency
limit, and a RoPE slot for the job's configuration."""

from __future__ import annotations

from typing import Protocol

from server.engines.base import Engine, EngineBusy, EngineDown
from server.plan import RopeConfig
from server.service.jobs import Draining, Overloaded, QueueWaitExceeded


class ServerLoad(Protocol):
    """What the capacity check reads of the service."""

    engine: Engine
    draining: bool
    restarting: bool
    max_concurrent_requests: int

    @property
    def active_requests(self) -> int: ...


def capacity_refusal(load: ServerLoad, rope: RopeConfig) -> Exception | None:
    """Why a job under `rope` cannot start now (429 or 503 as an exception to raise); None: it can."""
    if load.draining:
        return Draining("the server is shutting down; retry on another replica")
    if load.restarting or not load.engine.alive:
        return EngineDown("the engine is down and being restarted; retry later")
    if load.active_requests >= load.max_concurrent_requests:
        return Overloaded(f"the server is serving {load.active_requests} requests, its limit; retry later")
    if not load.engine.can_admit(rope):
        return EngineBusy(
            f"every RoPE slot of the engine is held by running requests of other configurations "
            f"({rope.label()} needs one); retry later"
        )
    return None


def refusal_reason(refusal: Exception) -> str:
    """Why a capacity refusal was made, as one of server.ops.metrics.REFUSAL_REASONS."""
    if isinstance(refusal, QueueWaitExceeded):
        return refusal.reason
    if isinstance(refusal, Draining):
        return "draining"
    if isinstance(refusal, Overloaded):
        return "max_concurrent_requests"
    if isinstance(refusal, EngineBusy):
        return "rope_slots"
    return "engine_down"
