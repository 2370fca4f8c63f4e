"""Whether the server can start a job now: not draining, an engine up, room under the concurrency
limit, and a RoPE slot for the job's configuration."""

from __future__ import annotations

from typing import Protocol

from server.engines.base import Engine
from server.plan import RopeConfig
from server.service.refusal import Refusal


class ServerLoad(Protocol):
    """What the capacity check reads of the service."""

    engine: Engine
    draining: bool
    restarting: bool
    max_concurrent_requests: int

    @property
    def active_requests(self) -> int: ...


def capacity_refusal(load: ServerLoad, rope: RopeConfig) -> Refusal | None:
    """Why a job under `rope` cannot start now (a 429 or 503 to raise); None: it can."""
    if load.draining:
        return Refusal("draining", 503, "the server is shutting down; retry on another replica")
    if load.restarting or not load.engine.alive:
        return Refusal("engine_down", 503, "the engine is down and being restarted; retry later")
    if load.active_requests >= load.max_concurrent_requests:
        return Refusal(
            "max_concurrent_requests",
            429,
            f"the server is serving {load.active_requests} requests, its limit; retry later",
        )
    if not load.engine.can_admit(rope):
        return Refusal(
            "rope_slots",
            429,
            f"every RoPE slot of the engine is held by running requests of other configurations "
            f"({rope.label()} needs one); retry later",
        )
    return None
