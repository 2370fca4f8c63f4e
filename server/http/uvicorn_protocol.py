"""uvicorn's HTTP protocol, bounded where uvicorn leaves a connection open to its client.

uvicorn times a connection out only between requests, and only while no byte arrives: a client
that opens a connection and sends nothing, or sends its headers a byte every few seconds, held
it for as long as it liked (100 of each were all still open after 130 s). This protocol (the
one uvicorn picks: httptools when installed, else h11) adds:

- a header timeout: a request's headers must be complete `header_timeout_s` after the connection
  opened or the previous response ended, else 408 and the connection closes;
- a bound on their size: more than `max_header_bytes` before the headers end is a 431 (h11 has
  its own bound, set to the same);
- JSON for what uvicorn refuses before the app sees a request (malformed framing: 400), in the
  app's error shape `{"error", "error_type"}`.

What the parser decides stays its own: which bytes are malformed, and that the connection then
closes. A body's own timeout is the app's (server/http/body_timeout.py).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # uvicorn without httptools runs h11
    HttpToolsProtocol = None  # type: ignore[assignment,misc]

from server.settings import Settings

MAX_HEADER_BYTES = 65_536
_REASONS = {400: "Bad Request", 408: "Request Timeout", 431: "Request Header Fields Too Large"}


def error_bytes(status: int, message: str) -> bytes:
    """A whole HTTP/1.1 error response in the app's error shape, closing the connection."""
    body = json.dumps({"error": message, "error_type": "validation"}).encode()
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class HeaderGuard:
    """Mixed into uvicorn's protocol classes (which set `loop`, `transport`, `cycle`: the request
    whose headers last arrived, its `response_complete`)."""

    header_timeout_s = 10.0
    max_header_bytes = MAX_HEADER_BYTES
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    cycle: Any

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)  # type: ignore[misc]

    def data_received(self, data: bytes) -> None:
        super().data_received(data)  # type: ignore[misc]
        if not self._awaiting_headers():
            return
        # Still no whole header: everything received since the timer was armed is header bytes.
        self._header_bytes += len(data)
        if self._header_bytes > self.max_header_bytes:
            limit = self.max_header_bytes
            self._refuse(431, f"headers: the request's headers are larger than {limit} bytes, this server's limit")

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self._arm()  # the next request's headers are awaited (none was pipelined)

    def send_400_response(self, msg: str) -> None:
        self._disarm()
        self.transport.write(error_bytes(400, f"request: malformed HTTP request ({msg.rstrip('.')})"))
        self.transport.close()

    def _arm(self) -> None:
        self._disarm()
        self._header_bytes = 0
        self._awaited_after = self.cycle
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _awaiting_headers(self) -> bool:
        """No request's headers completed since the timer was armed (a new one makes a new cycle)."""
        return self._header_timer is not None and self.cycle is self._awaited_after

    def _headers_too_slow(self) -> None:
        if self._awaiting_headers() and not self.transport.is_closing():
            seconds = f"{self.header_timeout_s:g}"
            self._refuse(
                408,
                f"headers: the request's headers did not arrive within {seconds} s, this server's limit "
                "(ROPESERVE_HEADER_TIMEOUT_S)",
            )
        self._header_timer = None

    def _refuse(self, status: int, message: str) -> None:
        self._disarm()
        self.transport.write(error_bytes(status, message))
        self.transport.close()


def protocol_class(
    header_timeout_s: float, max_header_bytes: int = MAX_HEADER_BYTES, base: type[asyncio.Protocol] | None = None
) -> type[asyncio.Protocol]:
    """uvicorn's protocol `base` (default: httptools when installed, as uvicorn's "auto"), guarded."""
    if base is None:
        base = HttpToolsProtocol if HttpToolsProtocol is not None else H11Protocol
    attributes = {"header_timeout_s": header_timeout_s, "max_header_bytes": max_header_bytes}
    return type(f"Guarded{base.__name__}", (HeaderGuard, base), attributes)


def server_config(app: Any, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """uvicorn's configuration of the app under `settings`, with the guarded protocol."""
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "access_log": False,
        "http": protocol_class(settings.header_timeout_s),
        "h11_max_incomplete_event_size": MAX_HEADER_BYTES,
        # What a drain that timed out leaves: cut after this (server/ops/drain.py waits first).
        "timeout_graceful_shutdown": 5,
    }
    return uvicorn.Config(app, **(options | overrides))
