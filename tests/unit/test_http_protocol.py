"""uvicorn's protocol as the server runs it (server/http/uvicorn_protocol.py): a header timeout, a bound on
the headers' size, JSON for what the parser refuses. A real uvicorn over the fake engine, raw
sockets; the real server's share is tests/e2e/test_hostile_server.py."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn

from server.app import create_app
from server.http.uvicorn_protocol import H11Protocol, protocol_class, server_config
from server.settings import Settings
from tests.support.fake_engine import fake_service_factory

HEADER_TIMEOUT_S = 1.0
REQUEST = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"


def _serve(protocol: type) -> Iterator[int]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = Settings(port=port, header_timeout_s=HEADER_TIMEOUT_S, log_level="warning")
    app = create_app(settings, fake_service_factory(delay=0.5))
    config = server_config(app, settings, http=protocol)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield port
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module", params=["auto", "h11"])
def port(request: pytest.FixtureRequest) -> Iterator[int]:
    """The protocol uvicorn picks (httptools where installed), and h11 (uvicorn without httptools)."""
    base = H11Protocol if request.param == "h11" else None
    yield from _serve(protocol_class(HEADER_TIMEOUT_S, base=base))


def _read_all(conn: socket.socket) -> bytes:
    reply = b""
    try:
        while chunk := conn.recv(65536):
            reply += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return reply


def _json_error(reply: bytes, status: int) -> dict:
    assert reply.startswith(f"HTTP/1.1 {status} ".encode()), reply[:200]
    head, _, body = reply.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower() and b"connection: close" in head.lower(), head
    error = json.loads(body)
    assert set(error) == {"error", "error_type"} and error["error_type"] == "validation", error
    return error


def test_connections_that_send_nothing_or_dribble_their_headers_are_closed_at_the_header_timeout(port):
    """100 of each were all still open after 130 s."""
    silent = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(100)]
    dribbling = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(100)]
    started = time.monotonic()
    for step, byte in enumerate(REQUEST[:8]):  # a byte each 0.2 s: never a whole header in time
        for conn in dribbling:
            with contextlib.suppress(OSError):
                conn.sendall(bytes([byte]))
        if step == 2:  # meanwhile the server answers others
            with socket.create_connection(("127.0.0.1", port), timeout=10) as ok:
                ok.sendall(REQUEST)
                assert ok.recv(65536).startswith(b"HTTP/1.1 200 ")
        time.sleep(0.2)
    replies = [_read_all(conn) for conn in silent + dribbling]
    closed_after = time.monotonic() - started
    for conn in silent + dribbling:
        conn.close()
    assert closed_after < HEADER_TIMEOUT_S + 2, closed_after
    for reply in replies:
        assert "ROPESERVE_HEADER_TIMEOUT_S" in _json_error(reply, 408)["error"]


def test_a_request_that_runs_longer_than_the_header_timeout_is_not_cut(port):
    body = b'{"inputs": "abcdef", "parameters": {"max_new_tokens": 3}}'  # 3 tokens at 0.5 s each
    head = (
        f"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        for _ in range(2):  # and the next request on the same connection
            conn.sendall(head.encode() + body)
            reply = conn.recv(65536)
            assert reply.startswith(b"HTTP/1.1 200 ") and b'"generated_text":"abc"' in reply, reply[:300]


def test_headers_over_the_size_bound_are_a_431_in_json(port):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        with contextlib.suppress(OSError):  # closed on us, as it should be
            for i in range(200):
                conn.sendall(f"X-Filler-{i}: {'a' * 1000}\r\n".encode())
        reply = _read_all(conn)
    if reply.startswith(b"HTTP/1.1 400 "):  # h11 enforces its own bound (set to the same size) first
        _json_error(reply, 400)
    else:
        assert "65536 bytes" in _json_error(reply, 431)["error"]


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
        b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: x\r\n\r\n",
    ],
    ids=["garbage", "header", "length"],
)
def test_malformed_framing_is_a_json_400(port, raw):
    """It was uvicorn's plain-text 400 ("Invalid HTTP request received.")."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(raw)
        error = _json_error(_read_all(conn), 400)
    assert error["error"].startswith("request: malformed HTTP request")
