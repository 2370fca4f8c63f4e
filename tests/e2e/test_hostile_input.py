"""Hostile bodies on every route of the real server: always a 4xx (or the request served), never a
424 or a 5xx, and `/health` answered within 0.5 s throughout, from a process of its own
(tests/support/health_watch.py). The probe's shapes (tests/support/hostile.py) at 64 KiB on every
route and at 30 MB each, nesting around where the parser ran out of stack, malformed bytes, and
hypothesis-drawn nested bodies; the long tier sends every shape at 30 MB to every route and draws
3,000 bodies. The shared session server (its default limits: 32 MiB bodies)."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support.health_watch import HealthWatch
from tests.support.hostile import BODIES, MALFORMED, SHAPES, json_values, nested_bodies, shape_body, shapes

pytestmark = [pytest.mark.engine, pytest.mark.default_tier]

MB30 = 30_000_000
HEALTH_BOUND_S = 0.5
# Each shape at 30 MB on the route whose field it is (the long tier: on every route).
HOME_ROUTE = {
    "messages": "/v1/chat/completions",
    "content parts": "/tokenize",
    "token ids": "/v1/completions",
    "nested token ids": "/v1/completions",
    "documents": "/generate",
    "empty documents": "/tokenize",
    "stop strings": "/v1/completions",
    "tgi stop strings": "/generate",
    "logit_bias map": "/v1/completions",
    "tools": "/v1/chat/completions",
    "empty lists": "/generate_stream",
    "empty objects": "/",
    "top-level keys": "/generate",
    "strategy keys": "/v1/chat/completions",
    "long text": "/tokenize",
    "escapes": "/v1/completions",
    "numbers": "/generate",
}
GET_ROUTES = ("/health", "/health/live", "/health/ready", "/info", "/strategies", "/metrics", "/v1/models")
# Requests a drawn body makes valid are cut here: the suite is about refusals, not long generation.
DRAWN_DEADLINE_S = 5


class Tally:
    """Statuses of the hostile requests sent, and those that broke the contract."""

    def __init__(self) -> None:
        self.statuses: Counter[int] = Counter()
        self.failures: list[str] = []
        self.slowest: tuple[float, str] = (0.0, "")

    def send(self, client: httpx.Client, method: str, route: str, name: str, body: bytes = b"") -> None:
        started = time.monotonic()
        reply = client.request(method, route, content=body, headers={"content-type": "application/json"})
        took = time.monotonic() - started
        self.slowest = max(self.slowest, (took, f"{method} {route} {name}"))
        self.statuses[reply.status_code] += 1
        if reply.status_code >= 500 or reply.status_code == 424:
            self.failures.append(f"{method} {route} {name}: {reply.status_code} {reply.text[:200]}")
        elif reply.status_code >= 400 and method != "HEAD" and not _error_shaped(reply):
            self.failures.append(f"{method} {route} {name}: {reply.status_code} not an error body: {reply.text[:200]}")

    @property
    def count(self) -> int:
        return sum(self.statuses.values())


def _error_shaped(reply: httpx.Response) -> bool:
    try:
        body = reply.json()
    except ValueError:
        return False
    # The contract's shape; a `model` the OpenAI routes do not serve answers in OpenAI's.
    return set(body) == {"error", "error_type"} or (reply.status_code == 404 and set(body) == {"error"})


def _drawn_bodies(count: int, derandomize: bool) -> list[tuple[str, bytes]]:
    """`count` bodies drawn by hypothesis: a route's valid body with drawn fields over it, or any
    JSON value at all (the same ones each run when `derandomize`)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    drawn: list[tuple[str, bytes]] = []
    fields = st.dictionaries(
        st.sampled_from(sorted({k for b in BODIES.values() for k in b})) | st.text(max_size=8), json_values()
    )

    @given(route=st.sampled_from(sorted(BODIES)), extra=fields, whole=json_values(), replace=st.booleans())
    @settings(
        max_examples=count,
        deadline=None,
        database=None,
        derandomize=derandomize,
        suppress_health_check=list(HealthCheck),
    )
    def draw(route: str, extra: dict[str, Any], whole: Any, replace: bool) -> None:
        body: Any = whole if replace else {**BODIES[route], **extra}
        if isinstance(body, dict) and route not in ("/tokenize", "/detokenize"):
            body["deadline_s"] = DRAWN_DEADLINE_S
        drawn.append((route, json.dumps(body).encode()))

    draw()
    return drawn


def _cases(tier: str) -> Iterator[tuple[str, str, str, bytes]]:
    """(method, route, name, body) of the tier, drawn bodies excluded; each 30 MB body built when
    its turn comes."""
    for route in BODIES:
        for name, body in shapes(route, 65_536).items():
            yield "POST", route, name, body
    big = [(name, route) for name, route in HOME_ROUTE.items()]
    if tier == "long":
        big = [(name, route) for name in SHAPES for route in BODIES]
    for name, route in big:
        yield "POST", route, f"{name} 30 MB", shape_body(route, name, MB30)
    cases = []
    for route in GET_ROUTES:
        cases += [("GET", route, "plain", b""), ("HEAD", route, "plain", b"")]
        cases += [
            ("POST", route, "deep", nested_bodies("/generate")["body nested 965"]),
            ("DELETE", route, "method", b""),
        ]
    cases += [("PUT", route, "method", MALFORMED["truncated"]) for route in BODIES]
    cases += [("POST", route + "/", "slash", b"{}") for route in BODIES if route != "/"]
    yield from cases


@pytest.mark.parametrize(
    ("tier", "drawn"), [pytest.param("default", 200), pytest.param("long", 3000, marks=pytest.mark.long_tier)]
)
def test_hostile_bodies_on_every_route_are_refused_and_health_stays_fast(base_url: str, tier: str, drawn: int) -> None:
    """Every finding of the fourth probe's shapes, on every route; `/health` < 0.5 s throughout."""
    tally = Tally()
    with HealthWatch(base_url) as watch, httpx.Client(base_url=base_url, timeout=300) as client:
        for method, route, name, body in _cases(tier):
            tally.send(client, method, route, name, body)
        for i, (route, body) in enumerate(_drawn_bodies(drawn, derandomize=tier == "default")):
            tally.send(client, "POST", route, f"drawn {i}", body)
    print(
        f"\n{tier} tier: {tally.count} hostile requests, statuses {dict(sorted(tally.statuses.items()))}, "
        f"slowest {tally.slowest[0]:.2f} s ({tally.slowest[1]}); /health {watch.report}"
    )
    assert tally.failures == []
    assert tally.count >= (3000 if tier == "long" else 400), tally.count
    assert watch.report["not_200"] == [] and watch.report["max_s"] < HEALTH_BOUND_S, watch.report


def test_echo_with_twenty_logprobs_is_built_off_the_event_loop(base_url: str, http: httpx.Client) -> None:
    """/health waited 1.1-1.4 s behind a 2,900-token echo with `logprobs: 20` (a 2.1 MB reply)."""
    prompt = "The quick brown fox jumps over the lazy dog near the river bank. " * 200
    body = {"prompt": prompt, "echo": True, "logprobs": 20, "max_tokens": 1, "temperature": 0}
    with HealthWatch(base_url, interval_s=0.02) as watch:
        reply = http.post("/v1/completions", json=body)
    assert reply.status_code == 200, reply.text[:300]
    logprobs = reply.json()["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) > 2800 and len(logprobs["top_logprobs"][1]) >= 20
    assert watch.report["max_s"] < HEALTH_BOUND_S, watch.report


def test_token_ids_past_the_engines_length_are_refused_at_once(http: httpx.Client) -> None:
    """A 16M-id prompt got the right 422 after 8.7 s: the ids were decoded before the length check."""
    longest = http.get("/info").json()["max_context_tokens"]
    started = time.monotonic()
    reply = http.post("/v1/completions", json={"prompt": [100] * (longest + 1), "max_tokens": 1})
    assert reply.status_code == 422 and reply.json()["error"].startswith("prompt: the token-id prompt has"), reply.text
    assert f"<= {longest}" in reply.json()["error"] and time.monotonic() - started < 3


def test_a_preset_with_its_replys_own_strategy_is_served(http: httpx.Client) -> None:
    """`…-dca` with the reply's resolved strategy, `…-rerope` with its default logn: both were 422."""
    served = http.get("/v1/models").json()["data"][0]["id"]
    body = {"prompt": "Hello", "max_tokens": 1, "temperature": 0}
    resolved = http.post("/v1/completions", json={**body, "model": f"{served}-dca"}).json()["strategy"]
    assert {"name": "dca", "chunk_size": 2048, "local_window": 256}.items() <= resolved.items()
    for model, strategy in ((f"{served}-dca", resolved), (f"{served}-rerope", {"name": "rerope", "logn": True})):
        reply = http.post("/v1/completions", json={**body, "model": model, "strategy": strategy})
        assert reply.status_code == 200 and reply.json()["model"] == model, reply.text
    other = http.post(
        "/v1/completions", json={**body, "model": f"{served}-dca", "strategy": {**resolved, "local_window": 128}}
    )
    assert other.status_code == 422 and other.json()["error"].startswith("strategy: the model"), other.text


@pytest.mark.parametrize("body", [{"prompt": "x", "context": []}, {"prompt": "x", "context": ["", "x"]}])
def test_tokenize_refuses_what_the_generation_routes_refuse(http: httpx.Client, body: dict[str, Any]) -> None:
    reply = http.post("/tokenize", json=body)
    assert reply.status_code == 422 and reply.json()["error"].startswith("context"), reply.text
    assert http.post("/v1/completions", json={**body, "max_tokens": 1}).status_code == 422
