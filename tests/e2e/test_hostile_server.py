"""What needs a real server of its own: API keys (set in the plain comma-separated form an
operator writes), and a short header timeout for a slowloris of 200 connections. One server for
the module; the header timeout and the keys are HTTP plumbing, the engine behind them the real one."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlparse

import httpx
import pytest

from tests.conftest import RunningServer, start_server, stop_server
from tests.support.health_watch import HealthWatch
from tests.support.hostile import BODIES, shape_body

pytestmark = [pytest.mark.engine, pytest.mark.default_tier]

HEADER_TIMEOUT_S = 2.0
KEYS = ("secret", "clé")


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    server = start_server(
        tmp_path_factory.mktemp("keyed"),
        {"ROPESERVE_API_KEYS": ",".join(KEYS), "ROPESERVE_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S)},
        name="keyed",
    )
    yield server
    stop_server(server)


def _address(server: RunningServer) -> tuple[str, int]:
    url = urlparse(server.url)
    return url.hostname or "127.0.0.1", url.port or 80


def _bearer(key: bytes) -> dict[str, bytes]:
    """The header for `key`; an empty key is `Bearer` alone (a client refuses a trailing space)."""
    return {"authorization": (b"Bearer " + key).rstrip(b" ")}


@pytest.mark.parametrize("route", sorted(BODIES))
def test_any_key_bytes_are_a_401_and_the_plain_keys_setting_works(keyed_server: RunningServer, route: str) -> None:
    """`Bearer secr\\xe9t`, an emoji or byte 0xff was a 424 with an ASGI traceback in the log."""
    body = json.dumps(BODIES[route]).encode()
    headers = {"content-type": "application/json"}
    with httpx.Client(base_url=keyed_server.url, timeout=120) as client:
        # (Trailing spaces are not a different key: HTTP parsers strip a header value's edges.)
        for token in (b"secr\xe9t", "😀".encode(), b"\xff", b"secret\xc2\xa0", b""):
            reply = client.post(route, content=body, headers={**headers, **_bearer(token)})
            assert reply.status_code == 401 and reply.headers["www-authenticate"] == "Bearer", (token, reply.text)
            assert reply.json()["error_type"] == "unauthorized"
        for key in KEYS:  # a key in any script, sent as its UTF-8 bytes
            assert client.post(route, content=body, headers={**headers, **_bearer(key.encode())}).status_code == 200
    assert "Traceback" not in keyed_server.log()


def test_without_a_key_the_body_is_not_parsed(keyed_server: RunningServer) -> None:
    """Malformed JSON got 422 before 401; an unauthenticated 30 MB body cost 1.8 s."""
    big = shape_body("/v1/chat/completions", "messages", 30_000_000)
    headers = {"content-type": "application/json"}
    with httpx.Client(base_url=keyed_server.url, timeout=120) as client:
        assert client.post("/v1/completions", content=b'{"prompt": ', headers=headers).status_code == 401
        started = time.monotonic()
        reply = client.post("/v1/chat/completions", content=big, headers=headers)
        assert reply.status_code == 401 and time.monotonic() - started < 2
        assert client.head("/health").status_code == 200 and client.get("/health/live").status_code == 200


def test_a_slowloris_of_200_connections_is_closed_at_the_header_timeout(keyed_server: RunningServer) -> None:
    """100 connections dribbling header bytes and 100 that sent nothing were all open after 130 s."""
    address = _address(keyed_server)
    silent = [socket.create_connection(address, timeout=30) for _ in range(100)]
    dribbling = [socket.create_connection(address, timeout=30) for _ in range(100)]
    started = time.monotonic()
    stop = threading.Event()

    def dribble() -> None:
        for byte in b"POST /generate HTTP/1.1\r\nHost: x\r\n":
            if stop.is_set():
                return
            for conn in dribbling:
                with contextlib.suppress(OSError):
                    conn.sendall(bytes([byte]))
            time.sleep(0.5)

    sender = threading.Thread(target=dribble, daemon=True)
    with HealthWatch(keyed_server.url) as watch:
        sender.start()
        closed_at = [_closed_after(conn, started) for conn in silent + dribbling]
        stop.set()
    sender.join()
    replies = [reply for _, reply in closed_at]
    last = max(at for at, _ in closed_at)
    print(
        f"\n200 slowloris connections closed within {last:.2f} s (header timeout {HEADER_TIMEOUT_S} s); /health {watch.report}"
    )
    assert last < HEADER_TIMEOUT_S + 1.5, last
    assert all(r.startswith(b"HTTP/1.1 408 ") and b"ROPESERVE_HEADER_TIMEOUT_S" in r for r in replies), replies[:2]
    assert watch.report["not_200"] == [] and watch.report["max_s"] < 0.5, watch.report


def _closed_after(conn: socket.socket, started: float) -> tuple[float, bytes]:
    """Seconds from `started` until the server closed `conn`, and what it sent before."""
    reply = b""
    with conn, contextlib.suppress(OSError):
        while chunk := conn.recv(65536):
            reply += chunk
    return time.monotonic() - started, reply


@pytest.mark.parametrize(
    "raw", [b"GARBAGE\r\n\r\n", b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n"]
)
def test_malformed_framing_is_answered_in_json(keyed_server: RunningServer, raw: bytes) -> None:
    with socket.create_connection(_address(keyed_server), timeout=30) as conn:
        conn.sendall(raw)
        reply = b""
        with contextlib.suppress(OSError):
            while chunk := conn.recv(65536):
                reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and b"application/json" in head, reply[:300]
    assert json.loads(body)["error"].startswith("request: malformed HTTP request")
