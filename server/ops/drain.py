"""Graceful shutdown: on SIGTERM, finish the requests in flight before the server stops.

Kubernetes (and any supervisor) sends SIGTERM, then SIGKILL after a grace period; meanwhile the
pod leaves the Service's endpoints, but requests still arrive for a few seconds. So on the first
SIGTERM (or Ctrl-C) the server keeps listening and:

- marks the service draining: `/health` answers 503 (readiness fails), a new generation request
  gets a 503 that says so (a client or load balancer retries another replica);
- lets the requests in flight finish, streams included, for at most `drain_timeout_s`;
- then shuts down as uvicorn does (the listener closes, the engine stops) and exits 0.

A second signal skips the wait (uvicorn's own shutdown, which cuts what is left).
"""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType
from typing import Protocol

import uvicorn
from starlette.datastructures import State

log = logging.getLogger(__name__)

DRAIN_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Drainable(Protocol):
    """What the server drains: the generation service (server/service/generation_service.py)."""

    draining: bool

    @property
    def active_requests(self) -> int: ...


class DrainingServer(uvicorn.Server):
    """uvicorn's server, with a drain between the first exit signal and the shutdown."""

    def __init__(self, config: uvicorn.Config, app_state: State, drain_timeout_s: float) -> None:
        super().__init__(config)
        # The app's state holds the service once the lifespan has started it (None before).
        self._app_state = app_state
        self.drain_timeout_s = drain_timeout_s
        self.drain_started: float | None = None

    def service(self) -> Drainable | None:
        return getattr(self._app_state, "service", None)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain_started is None and sig in DRAIN_SIGNALS and self.drain_timeout_s > 0 and not self.should_exit:
            self._captured_signals.append(sig)  # uvicorn re-raises it after shutdown, as usual
            self.drain_started = time.monotonic()
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        if self.drain_started is None:
            return False
        service = self.service()
        if service is None:  # still starting: nothing to drain
            return True
        if not service.draining:
            service.draining = True
            log.info("draining: %d requests in flight; new requests get 503", service.active_requests)
        if service.active_requests == 0:
            log.info("drained in %.1f s; shutting down", time.monotonic() - self.drain_started)
            return True
        if time.monotonic() - self.drain_started > self.drain_timeout_s:
            log.warning(
                "drain timeout (%.0f s) passed with %d requests in flight; shutting down",
                self.drain_timeout_s,
                service.active_requests,
            )
            return True
        return False
