"""ropeserve behind a real vLLM router (PyPI vllm-router), over two fake-engine replicas: what
passes through it unchanged, and the document key that sends a document to one replica.

HTTP plumbing only (the fake engine echoes its prompt); the real engines behind the router, with
the prefix cache, are tests/e2e/test_fleet_router.py.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from clients.bench_scaling import replica_that_served, requests_served, vllm_router
from clients.client import ROUTING_HEADER, RopeserveClient, document_routing_key
from server.app import create_app
from server.schemas import ROUTER_FILLED_FIELDS
from server.settings import Settings
from tests.conftest import free_port
from tests.support.fake_engine import fake_service_factory

YARN = {"name": "yarn", "factor": 2}


@pytest.fixture(scope="module")
def replicas() -> Iterator[list[str]]:
    """Two fake-engine servers, each in a thread of its own."""
    servers = []
    for _ in range(2):
        config = uvicorn.Config(
            create_app(Settings(), fake_service_factory()), host="127.0.0.1", port=free_port(), log_level="warning"
        )
        server = uvicorn.Server(config)
        threading.Thread(target=server.run, daemon=True).start()
        servers.append(server)
    deadline = time.monotonic() + 30
    while not all(s.started for s in servers):
        assert time.monotonic() < deadline, "the fake replicas did not start"
        time.sleep(0.05)
    yield [f"http://127.0.0.1:{s.config.port}" for s in servers]
    for server in servers:
        server.should_exit = True


@pytest.fixture(scope="module")
def router(replicas: list[str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with vllm_router(replicas, tmp_path_factory.mktemp("router")) as url:
        yield url


def _served_by(replicas: list[str], send: Any) -> int:
    """Which replica (index) served the request `send()` makes."""
    before = [requests_served(url) for url in replicas]
    send()
    replica = replica_that_served(replicas, before)
    assert replica >= 0, "not exactly one replica served it"
    return replica


def test_generate_stream_passes_strategy_context_and_priority_unchanged(router: str) -> None:
    parameters = {"max_new_tokens": 3, "details": True}
    body = {"inputs": "Q", "context": "the document", "strategy": YARN, "priority": -5, "parameters": parameters}
    with httpx.stream("POST", f"{router}/generate_stream", json=body, timeout=30) as reply:
        assert reply.status_code == 200
        events = [json.loads(line[5:]) for line in reply.iter_lines() if line.startswith("data:")]
    last = events[-1]
    assert last["strategy"]["name"] == "yarn" and last["strategy"]["factor"] == 2.0
    assert last["generated_text"] == "the"  # the fake engine echoes the prompt: the document came first


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_openai_routes_pass_presets_strategy_and_context(router: str, route: str) -> None:
    """The router rewrites OpenAI bodies through SGLang's schema (adding ROUTER_FILLED_FIELDS) and
    keeps the fields it does not know, ropeserve's among them."""
    ask: dict[str, Any] = (
        {"prompt": "Q"} if route == "/v1/completions" else {"messages": [{"role": "user", "content": "Q"}]}
    )
    models = [m["id"] for m in httpx.get(f"{router}/v1/models", timeout=30).json()["data"]]
    assert "fake-dca" in models
    preset = httpx.post(f"{router}{route}", json={"model": "fake-dca", "max_tokens": 2, **ask}, timeout=30)
    assert preset.status_code == 200, preset.text
    assert preset.json()["model"] == "fake-dca" and preset.json()["strategy"]["name"] == "dca"
    body = {"model": "fake", "max_tokens": 3, "strategy": YARN, "context": "doc", "priority": 1, **ask}
    explicit = httpx.post(f"{router}{route}", json=body, timeout=30)
    assert explicit.status_code == 200, explicit.text
    assert explicit.json()["strategy"]["name"] == "yarn"
    text = explicit.json()["choices"][0].get("text") or explicit.json()["choices"][0]["message"]["content"]
    assert text == "doc"  # the fake engine echoes the prompt, whose first tokens are the context


def test_one_document_goes_to_one_replica_and_documents_spread(router: str, replicas: list[str]) -> None:
    with RopeserveClient(router) as client:

        def ask(question: str, document: str) -> None:
            list(client.generate_stream(question, context=document, max_new_tokens=2))

        placed = {}
        for i in range(6):
            document = f"document number {i}"
            first = _served_by(replicas, lambda d=document: ask("Q", d))
            assert _served_by(replicas, lambda d=document: ask("Another question", d)) == first, document
            placed[document] = first
    assert set(placed.values()) == {0, 1}, placed  # the documents' keys (fixed here) hash to both replicas


def test_openai_clients_route_by_the_same_header(router: str, replicas: list[str]) -> None:
    document = "a document an OpenAI client sends"
    headers = {ROUTING_HEADER: document_routing_key(document)}

    def ask(question: str) -> None:
        body = {"model": "fake", "prompt": question, "context": document, "max_tokens": 2}
        assert httpx.post(f"{router}/v1/completions", json=body, headers=headers, timeout=30).status_code == 200

    with RopeserveClient(router) as client:
        native = _served_by(replicas, lambda: list(client.generate_stream("Q", context=document, max_new_tokens=2)))
    assert [_served_by(replicas, lambda q=q: ask(q)) for q in ("one", "two")] == [native, native]


def test_generate_is_not_passed_through_unchanged(router: str) -> None:
    """vllm-router parses /generate as SGLang's request and forwards only SGLang's fields: TGI's
    `inputs` is lost, and ropeserve says so (docs/scaling.md: use /generate_stream or the OpenAI routes)."""
    reply = httpx.post(f"{router}/generate", json={"inputs": "Q", "parameters": {"max_new_tokens": 2}}, timeout=30)
    assert reply.status_code == 422 and "inputs: Field required" in reply.json()["error"]


def test_document_key_names_the_documents() -> None:
    assert document_routing_key("a") == document_routing_key(["a"]) != document_routing_key(["a", "b"])
    assert document_routing_key(["a", "b"]) != document_routing_key(["b", "a"])
    assert document_routing_key("a").startswith("doc-") and len(document_routing_key("a")) == 36


@pytest.mark.parametrize("name", sorted(ROUTER_FILLED_FIELDS))
def test_router_filled_fields_are_accepted_at_the_routers_value_only(name: str) -> None:
    value = ROUTER_FILLED_FIELDS[name]
    with TestClient(create_app(Settings(), fake_service_factory())) as client:
        for route, ask in (
            ("/v1/completions", {"prompt": "Q"}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Q"}]}),
        ):
            ok = client.post(route, json={"max_tokens": 2, name: value, **ask})
            assert ok.status_code == 200, ok.text
            refused = client.post(route, json={"max_tokens": 2, name: not value, **ask})
            assert refused.status_code == 422
            assert refused.json()["error"] == f"{name}: only {json.dumps(value)} is supported by ropeserve"
            assert client.post(route, json={"max_tokens": 2, name: "yes", **ask}).status_code == 422


def test_the_installed_router_is_the_one_the_project_pins() -> None:
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert f'"vllm-router=={version("vllm-router")}"' in pyproject
