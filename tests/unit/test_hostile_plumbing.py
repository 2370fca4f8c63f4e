"""Hostile input and faults, HTTP side (fake engine; the real server's share is
tests/e2e/test_hostile_input.py): bodies measured before parsed, every list bounded in count,
keys from the headers before the body, health split, redirects, settings."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from server.app import create_app
from server.http.json_body import MAX_JSON_DEPTH, measure_json
from server.settings import Settings
from tests.support.fake_engine import FAKE_MODEL, FakeEngine, fake_service_factory
from tests.support.hostile import BODIES, MALFORMED, json_values, shape_body, shapes

KEYED_ROUTES = tuple(BODIES)


def _client(engine: FakeEngine | None = None, **options: Any) -> TestClient:
    return TestClient(create_app(Settings(**options), fake_service_factory(engine=engine or FakeEngine())))


def _assert_refused(reply: Any, status: int = 422, *words: str) -> dict[str, Any]:
    assert reply.status_code == status, reply.text[:500]
    body = reply.json()
    assert set(body) == {"error", "error_type"}, body
    for word in words:
        assert word in body["error"], body["error"]
    return body


# --- the body's shape, measured on its bytes -------------------------------------------------------


def _items(value: Any) -> int:
    if isinstance(value, list):
        return 1 + sum(_items(v) for v in value)
    if isinstance(value, dict):
        return 1 + len(value) + sum(_items(v) for v in value.values())
    return 1


def _depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    return 0


@settings(max_examples=300, deadline=None, derandomize=True)
@given(value=json_values(max_leaves=40), ensure_ascii=st.booleans(), indent=st.sampled_from([None, 1]))
def test_the_measure_of_a_body_is_its_values_and_depth_whatever_its_strings_hold(value, ensure_ascii, indent):
    body = json.dumps(value, ensure_ascii=ensure_ascii, indent=indent).encode()
    shape = measure_json(body)
    assert (shape.items, shape.depth) == (_items(value), _depth(value)), body[:300]


@pytest.mark.parametrize("text", ["a,b:c[d{e", '\\"[', "\\\\", '\\\\"', '\\\\\\"{', "}{][", "\u2028[", "😀{"], ids=repr)
def test_brackets_quotes_and_backslashes_inside_strings_count_as_one_string(text):
    body = json.dumps({"inputs": text, "context": [text, {"k": [text]}]}).encode()
    assert (measure_json(body).items, measure_json(body).depth) == (10, 4)


@pytest.mark.parametrize("route", KEYED_ROUTES)
def test_every_probe_shape_on_every_route_is_a_4xx_or_served_and_over_a_bound_never_parsed(route, monkeypatch):
    import server.http.json_body

    parsed: list[int] = []
    real_loads = server.http.json_body.json.loads
    monkeypatch.setattr(server.http.json_body.json, "loads", lambda text: parsed.append(len(text)) or real_loads(text))
    with _client() as client:
        for name, body in {**shapes(route, 1_000_000), **MALFORMED}.items():
            started = time.monotonic()
            reply = client.post(route, content=body, headers={"content-type": "application/json"})
            took = time.monotonic() - started
            assert reply.status_code < 500 and reply.status_code != 424, (name, reply.status_code, reply.text[:300])
            if reply.status_code >= 400:
                assert set(reply.json()) == {"error", "error_type"}, (name, reply.text[:300])
            if reply.json().get("error", "").startswith("body: the JSON body"):
                assert not parsed or parsed[-1] != len(body), name  # refused unparsed
            assert took < 3, (name, took)
        deep = client.post(route, content=b"[" * 1000 + b"]" * 1000, headers={"content-type": "application/json"})
        _assert_refused(deep, 422, "nests 1000 deep", str(MAX_JSON_DEPTH))


@pytest.mark.parametrize("depth", [962, 965, 968])
@pytest.mark.parametrize("route", KEYED_ROUTES)
def test_nesting_where_the_parser_ran_out_of_stack_is_a_422_naming_the_bound(route, depth):
    """It was a 424 ("RecursionError") with a traceback on every route."""
    with _client() as client:
        for body in (
            b"[" * depth + b"]" * depth,
            json.dumps(BODIES[route])[:-1].encode() + b', "strategy": ' + b"[" * depth + b"]" * depth + b"}",
        ):
            reply = client.post(route, content=body, headers={"content-type": "application/json"})
            _assert_refused(reply, 422, "body: the JSON body nests", f"limit is {MAX_JSON_DEPTH}")


# --- every list bounded in count -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("route", "body", "says"),
    [
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "a"}] * 2049},
            "messages: List should have at most 2048",
        ),
        (
            "/tokenize",
            {"messages": [{"role": "user", "content": "a"}] * 2049},
            "messages: List should have at most 2048",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "text", "text": ""}] * 4097}]},
            "4097 content parts in all messages; the limit is 4096",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}] * 100}] * 50},
            "5000 content parts",
        ),
        ("/generate", {"inputs": "x", "context": ["a"] * 1025}, "context: List should have at most 1024"),
        ("/v1/completions", {"prompt": "x", "context": ["a"] * 1025}, "context: List should have at most 1024"),
        ("/tokenize", {"prompt": "x", "context": ["a"] * 1025}, "context: List should have at most 1024"),
        ("/v1/completions", {"prompt": "x", "stop": ["s"] * 17}, "stop"),
        (
            "/v1/completions",
            {"prompt": "x", "logit_bias": {str(i): 1 for i in range(129)}},
            "logit_bias: Dictionary should have at most 128",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "a"}], "tools": [{}] * 129},
            "tools: List should have at most 128",
        ),
    ],
)
def test_each_list_is_refused_past_its_count_naming_the_field_and_the_bound(route, body, says):
    with _client() as client:
        _assert_refused(client.post(route, json=body), 422, says)


def test_a_million_chat_messages_are_refused_at_once():
    """It was a 422 after 18.4 s with /health blocked 17.3 s."""
    body = shape_body("/v1/chat/completions", "messages", 30_000_000)
    with _client() as client:
        for route in ("/v1/chat/completions", "/tokenize"):
            started = time.monotonic()
            reply = client.post(route, content=body, headers={"content-type": "application/json"})
            _assert_refused(reply, 422, "more than 262144 values")
            assert time.monotonic() - started < 2


# --- token ids --------------------------------------------------------------------------------------


class CountingTokenizerEngine(FakeEngine):
    """A fake engine whose model has a max_model_len, to refuse token ids past it."""

    def __init__(self) -> None:
        super().__init__()
        self.model = dataclasses.replace(FAKE_MODEL, max_context_tokens=1000)


def test_token_ids_past_the_engines_length_are_refused_before_they_are_decoded(monkeypatch):
    from tests.support.fake_engine import ByteTokenizer

    decoded: list[int] = []
    real_decode = ByteTokenizer.decode
    monkeypatch.setattr(
        ByteTokenizer, "decode", lambda self, ids, **kw: decoded.append(len(ids)) or real_decode(self, ids)
    )
    with _client(engine=CountingTokenizerEngine()) as client:
        reply = client.post("/v1/completions", json={"prompt": [104] * 2000, "max_tokens": 1})
        _assert_refused(reply, 422, "prompt: the token-id prompt has 2000 tokens", "<= 1000")
        assert 2000 not in decoded
        ok = client.post("/v1/completions", json={"prompt": [104, 105], "max_tokens": 2, "temperature": 0})
        assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == "hi"


def test_detokenize_takes_a_long_list_off_the_loop_and_refuses_ids_outside_the_vocabulary():
    with _client() as client:
        assert client.post("/detokenize", json={"tokens": [104] * 200_000}).json()["prompt"] == "h" * 200_000
        _assert_refused(client.post("/detokenize", json={"tokens": [104, 256]}), 422, "tokens: token id 256")


# --- /tokenize under the generation routes' limits ----------------------------------------------------


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"prompt": "x" * 11}, "prompt: prompt and context together hold 11 characters; the limit is 10"),
        ({"prompt": "x", "context": "y" * 10}, "together hold 11 characters"),
        ({"messages": [{"role": "user", "content": "x" * 11}]}, "messages: messages and context together hold 11"),
        ({"prompt": "x", "context": []}, "context must hold at least one document"),
        ({"prompt": "x", "context": ["", "x"]}, "context documents must be non-empty"),
        ({"messages": [{"role": "user", "content": "x"}], "context": []}, "context must hold at least one document"),
    ],
)
def test_tokenize_applies_the_generation_routes_limits(body, says):
    """A 30M-character prompt got 200 after 24.8 s; empty context lists were accepted there only."""
    with _client(max_input_chars=10) as client:
        _assert_refused(client.post("/tokenize", json=body), 422, says)
        assert client.post("/tokenize", json={"prompt": "x" * 10}).json()["count"] == 10


def test_chat_messages_over_the_character_limit_are_refused_before_the_template():
    with _client(max_input_chars=10) as client:
        reply = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * 11}]})
        _assert_refused(reply, 422, "messages: messages and context together hold 11 characters")


# --- a preset with its own strategy spelled out -------------------------------------------------------


class WideEngine(FakeEngine):
    """A fake engine with a 4,096-token window: the window strategies' and DCA's smallest
    parameters (128) fit under it."""

    def __init__(self) -> None:
        super().__init__()
        self.model = dataclasses.replace(FAKE_MODEL, native_window=4096)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_preset_with_the_same_strategy_spelled_out_is_served(path):
    """`…-dca` with the reply's own resolved strategy, or `…-rerope` with its default logn, was a 422."""
    body = (
        {"prompt": "abc", "max_tokens": 2}
        if path == "/v1/completions"
        else {
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2,
        }
    )
    with _client(engine=WideEngine()) as client:
        resolved = client.post(path, json={**body, "model": "fake-dca"}).json()["strategy"]
        assert {"name", "chunk_size", "local_window"} <= set(resolved)
        for model, strategy in (
            ("fake-dca", resolved),
            ("fake-dca", {"name": "dca", "chunk_size": resolved["chunk_size"]}),
            ("fake-rerope", {"name": "rerope", "logn": True}),
            ("fake-rerope", "rerope"),
        ):
            reply = client.post(path, json={**body, "model": model, "strategy": strategy})
            assert reply.status_code == 200, (model, strategy, reply.text)
            assert reply.json()["model"] == model
        for model, strategy in (
            ("fake-dca", {**resolved, "chunk_size": resolved["chunk_size"] // 2}),
            ("fake-rerope", {"name": "rerope", "logn": False}),
            ("fake-dca", {"name": "dca", "bogus": 1}),
        ):
            reply = client.post(path, json={**body, "model": model, "strategy": strategy})
            _assert_refused(reply, 422, "strategy: the model", f"`{model}`")


# --- keys, from the headers, before the body ---------------------------------------------------------


BAD_TOKENS = [b"Bearer secr\xe9t", "Bearer 😀".encode(), b"Bearer \xff", b"Bearer ", b"Basic secret", b"bearer wrong"]


@pytest.mark.parametrize("route", KEYED_ROUTES)
def test_any_bytes_as_a_key_are_a_401_never_a_server_error(route):
    """A non-ASCII key was a 424 ("comparing strings with non-ASCII characters is not supported")."""
    app = create_app(Settings(api_keys=["secret", "clé"]), fake_service_factory())
    for token in BAD_TOKENS:
        status, headers, body = asyncio.run(
            _call(app, route, [(b"authorization", token)], json.dumps(BODIES[route]).encode())
        )
        assert status == 401, (token, body)
        assert (b"www-authenticate", b"Bearer") in headers and json.loads(body)["error_type"] == "unauthorized"


def test_a_key_in_any_script_is_compared_as_its_utf8_bytes():
    with _client(api_keys=["secret", "clé"]) as client:
        for key in ("secret", "clé"):
            headers = {"authorization": b"Bearer " + key.encode()}
            assert client.post("/generate", json=BODIES["/generate"], headers=headers).status_code == 200, key
        assert client.get("/health").status_code == 200 and client.head("/health/live").status_code == 200


async def _call(
    app: Any, path: str, headers: list[tuple[bytes, bytes]], body: bytes, method: str = "POST"
) -> tuple[int, list, bytes]:
    """One request straight into the ASGI app (the path as sent); raises if the app reads the body."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        raise AssertionError("the body was read before the key was checked")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    return (
        start["status"],
        start["headers"],
        b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"),
    )


@pytest.mark.parametrize(
    "body", [b"not json", b"[" * 5000, b'{"inputs": ' + b'"a",' * 1_000_000 + b"}"], ids=["malformed", "deep", "huge"]
)
def test_without_a_key_the_body_is_never_read(body):
    """Malformed JSON got a 422 before the 401, and an unauthenticated 30 MB body cost its parse."""
    app = create_app(Settings(api_keys=["secret"]), fake_service_factory())
    status, _, _ = asyncio.run(_call(app, "/v1/completions", [], body))
    assert status == 401


@pytest.mark.parametrize(
    ("value", "keys"),
    [
        ("secret", ["secret"]),
        ("k1,k2", ["k1", "k2"]),
        (" k1 , k2 ", ["k1", "k2"]),
        ('["a,b", "c"]', ["a,b", "c"]),
        ("", []),
    ],
)
def test_api_keys_setting_takes_one_key_a_comma_list_or_json(monkeypatch, value, keys):
    monkeypatch.setenv("ROPESERVE_API_KEYS", value)
    assert Settings().api_keys == keys


@pytest.mark.parametrize(
    ("value", "says"), [("a,,b", "an empty key"), ('["a"', "not a valid JSON list"), ("[1]", "strings only")]
)
def test_a_malformed_api_keys_setting_stops_serve_with_one_line(value, says):
    """`ROPESERVE_API_KEYS=secret ropeserve serve` died with a pydantic SettingsError traceback."""
    env = {"ROPESERVE_API_KEYS": value, "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-m", "clients.cli", "serve"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ropeserve serve: ROPESERVE_API_KEYS: ") and says in lines[0], lines


# --- health: HEAD, readiness and liveness ------------------------------------------------------------


def test_health_answers_head_and_splits_readiness_from_liveness():
    with _client() as client:
        for path in ("/health", "/health/ready", "/health/live"):
            head = client.head(path)
            assert head.status_code == 200 and head.content == b"", path
            assert client.get(path).json() == {"status": "ok"}
        service = client.app.state.service
        for state in ("restarting", "draining"):
            setattr(service, state, True)
            assert client.get("/health").status_code == 503 and client.head("/health").status_code == 503, state
            assert client.get("/health/ready").status_code == 503, state
            assert client.get("/health/live").status_code == 200, state
            setattr(service, state, False)
        paths = client.get("/openapi.json").json()["paths"]
        assert {"get", "head"} <= set(paths["/health/live"]) and {"get", "head"} <= set(paths["/health/ready"])


def test_a_dead_engine_fails_readiness_at_once():
    engine = FakeEngine()
    with _client(engine=engine) as client:
        engine.alive = False  # what VllmEngine.alive says the moment an engine-core process exits
        assert client.get("/health").status_code == 503 and client.get("/health/ready").status_code == 503
        assert client.get("/health/live").status_code == 200


# --- redirects -------------------------------------------------------------------------------------


def test_a_trailing_slash_redirects_relative_whatever_the_host_header():
    """`Host: evil.example` turned `/generate/` into `Location: http://evil.example/generate`."""
    with _client() as client:
        reply = client.post("/generate/?x=1", json={}, headers={"host": "evil.example"}, follow_redirects=False)
        assert reply.status_code == 307 and reply.headers["location"] == "/generate?x=1"
        assert client.get("/v1/models/", follow_redirects=False).headers["location"] == "/v1/models"
    app = create_app(Settings(), fake_service_factory())
    for path in ("//evil.example/", "//generate/", "/nope/", "/generate//evil.example/"):
        status, headers, _ = asyncio.run(_call(app, path, [(b"host", b"evil.example")], b"", method="GET"))
        assert status == 404 and not any(name == b"location" for name, _ in headers), path


# --- strategy parameters bounded where their cost stops being sane -----------------------------------


@pytest.mark.parametrize(
    ("strategy", "says"),
    [
        ({"name": "rerope", "window": 1}, "strategy.window: Input should be greater than or equal to 128"),
        ({"name": "rerope", "window": 127}, "strategy.window: Input should be greater than or equal to 128"),
        ({"name": "leaky_rerope", "window": 64}, "strategy.window"),
        ({"name": "self_extend", "window": 64, "group": 4}, "strategy.window"),
        (
            {"name": "dca", "chunk_size": 2, "local_window": 1},
            "strategy.chunk_size: Input should be greater than or equal to 256",
        ),
        (
            {"name": "dca", "chunk_size": 300, "local_window": 200},
            "chunk_size - local_window (300 - 200) must be >= 128",
        ),
        ({"name": "auto", "scoring": [{"name": "rerope", "window": 8}]}, "strategy.scoring[0].window"),
        ({"name": "nbce", "rope": {"name": "rerope", "window": 8}}, "window"),
    ],
)
def test_window_and_chunk_parameters_below_their_bound_are_refused(strategy, says):
    """`rerope` window 1 and `dca` chunks of one token made a request 2.5-3.2x as long, unseen by admission."""
    with _client() as client:
        reply = client.post("/generate", json={"inputs": "x", "context": ["a"], "strategy": strategy})
        _assert_refused(reply, 422, says)


@pytest.mark.parametrize("name", ["server.http.json_body", "server.http.api_keys", "tests.support.hostile"])
def test_docstring_examples_of_the_bounding_modules(name):
    import doctest
    import importlib

    assert doctest.testmod(importlib.import_module(name)).failed == 0
