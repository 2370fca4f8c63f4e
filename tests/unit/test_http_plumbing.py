"""HTTP plumbing that needs no model: auth, overload, OpenAPI, limits (fake engine)."""

from __future__ import annotations

import threading
import time

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.engines.base import RopeConfig
from server.settings import Settings
from tests.support.fake_engine import FakeEngine, fake_service_factory


def _client(delay: float = 0.0, **settings) -> TestClient:
    return TestClient(create_app(Settings(**settings), fake_service_factory(delay)))


def test_api_keys_are_required_when_configured():
    with _client(api_keys=["s3cret"]) as client:
        body = {"inputs": "hello", "parameters": {"max_new_tokens": 3}}
        missing = client.post("/generate", json=body)
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"] == "Bearer"
        assert missing.json()["error_type"] == "unauthorized"
        assert "authorization" in missing.json()["error"]
        wrong = client.post("/generate", json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        ok = client.post("/generate", json=body, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["generated_text"] == "hel"
        assert client.get("/health").status_code == 200  # liveness stays open for probes


def test_full_server_answers_429_and_recovers():
    with _client(delay=0.05, max_concurrent_requests=1) as client:
        slow_body = {"inputs": "abcdef", "parameters": {"max_new_tokens": 40}}
        results: list[int] = []
        worker = threading.Thread(target=lambda: results.append(client.post("/generate", json=slow_body).status_code))
        worker.start()
        time.sleep(0.5)
        busy = client.post("/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 1}})
        assert busy.status_code == 429
        assert busy.json()["error_type"] == "overloaded"
        assert busy.headers["retry-after"] == "1"
        worker.join()
        assert results == [200]
        again = client.post("/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 1}})
        assert again.status_code == 200


class BusyEngine(FakeEngine):
    """An engine whose RoPE slots are all held by other configurations."""

    def can_admit(self, rope: RopeConfig) -> bool:
        return rope.is_native


@pytest.mark.parametrize("route", ["/generate", "/generate_stream"])
def test_a_full_rope_slot_table_answers_429_at_once(route: str):
    with TestClient(create_app(Settings(), fake_service_factory(engine=BusyEngine()))) as client:
        reply = client.post(route, json={"inputs": "x", "parameters": {"max_new_tokens": 2}, "strategy": "yarn"})
        assert reply.status_code == 429, reply.text
        assert reply.json()["error_type"] == "overloaded" and "RoPE slot" in reply.json()["error"]
        assert reply.headers["retry-after"] == "1"
        assert client.post(route, json={"inputs": "x", "parameters": {"max_new_tokens": 2}}).status_code == 200


def test_prompt_longer_than_fake_window_names_limit():
    with _client() as client:
        reply = client.post("/generate", json={"inputs": "y" * 100, "parameters": {"max_new_tokens": 1}})
        assert reply.status_code == 422
        assert "64" in reply.json()["error"]


def test_input_character_limit():
    with _client(max_input_chars=10) as client:
        reply = client.post("/generate", json={"inputs": "abc", "context": "0123456789"})
        assert reply.status_code == 422
        assert "10" in reply.json()["error"] and "inputs" in reply.json()["error"]


def test_openapi_documents_every_route():
    with _client() as client:
        paths = client.get("/openapi.json").json()["paths"]
    for path in (
        "/generate",
        "/generate_stream",
        "/",
        "/v1/completions",
        "/strategies",
        "/info",
        "/health",
        "/metrics",
    ):
        assert path in paths


def test_unknown_route_is_json_404():
    with _client() as client:
        reply = client.get("/nope")
        assert reply.status_code == 404
        assert set(reply.json()) == {"error", "error_type"}


@pytest.mark.parametrize("path", ["/generate", "/v1/completions"])
def test_wrong_method_is_json_405(path):
    with _client() as client:
        reply = client.get(path)
        assert reply.status_code == 405
        assert set(reply.json()) == {"error", "error_type"}


def test_wrong_method_answers_405_with_allow():
    with _client() as client:
        reply = client.get("/generate")
        assert reply.status_code == 405 and reply.headers["allow"] == "POST"
        assert reply.json()["error_type"] == "validation"


def test_bodies_over_the_limit_are_refused_with_413_unread_or_while_read():
    with _client(max_body_bytes=2048) as client:
        big = {"inputs": "x" * 4096, "parameters": {"max_new_tokens": 1}}
        declared = client.post("/generate", json=big)
        assert declared.status_code == 413, declared.text
        assert declared.json()["error_type"] == "validation" and "2048 bytes" in declared.json()["error"]

        def chunks():  # no Content-Length: counted while the route reads it
            yield b'{"inputs": "'
            for _ in range(8):
                yield b"y" * 512
            yield b'"}'

        chunked = client.post("/generate", content=chunks(), headers={"content-type": "application/json"})
        assert chunked.status_code == 413, chunked.text
        assert client.post("/generate", json={"inputs": "ok", "parameters": {"max_new_tokens": 1}}).status_code == 200


def test_unencodable_text_in_an_error_message_does_not_break_the_reply():
    with _client() as client:
        reply = client.post(
            "/generate",
            content=b'{"inputs": "hi", "strategy": "\\ud800"}',
            headers={"content-type": "application/json"},
        )
        assert reply.status_code == 422, reply.text
        assert reply.json()["error_type"] == "validation" and "strategy" in reply.json()["error"]


def test_an_nbce_row_group_larger_than_one_engine_step_is_refused_at_once():
    # The fake engine runs 8 rows per step; 20 documents make 21 rows (vLLM: max_num_seqs).
    with _client() as client:
        body = {
            "inputs": "Say hi.",
            "parameters": {"max_new_tokens": 2},
            "strategy": "nbce",
            "context": [f"doc {i}" for i in range(20)],
        }
        started = time.monotonic()
        reply = client.post("/generate", json=body)
        assert reply.status_code == 422, reply.text
        assert reply.json()["error"].startswith("context: ") and "21 rows" in reply.json()["error"]
        assert time.monotonic() - started < 5


def test_a_request_past_its_deadline_gets_408_and_its_engine_row_is_aborted():
    engine = FakeEngine(delay=0.05)
    with TestClient(create_app(Settings(), fake_service_factory(engine=engine))) as client:
        started = time.monotonic()
        reply = client.post(
            "/generate", json={"inputs": "abcdef", "parameters": {"max_new_tokens": 50}, "deadline_s": 0.3}
        )
        assert reply.status_code == 408, reply.text
        assert reply.json()["error"].startswith("deadline_s: ") and time.monotonic() - started < 3
        assert engine.cancelled == 1  # the row's stream was cancelled, which aborts it in vLLM
        ok = client.post("/generate", json={"inputs": "abc", "parameters": {"max_new_tokens": 2}, "deadline_s": 30})
        assert ok.status_code == 200
    # The server's request_timeout_s caps every request, with or without deadline_s.
    with TestClient(create_app(Settings(request_timeout_s=0.2), fake_service_factory(delay=0.05))) as client:
        reply = client.post("/v1/completions", json={"prompt": "abcdef", "max_tokens": 50, "deadline_s": 60})
        assert reply.status_code == 408, reply.text


def test_token_id_prompts_are_checked_before_anything_decodes_them():
    with _client() as client:
        for prompt in ([-1], [2**40], [], [[1, 2], [3]]):
            reply = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1})
            assert reply.status_code == 422 and reply.json()["error"].startswith("prompt"), (prompt, reply.text)
        ok = client.post("/v1/completions", json={"prompt": [104, 105], "max_tokens": 2, "temperature": 0})
        assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == "hi"


def test_chat_routes_through_the_tokenizers_template_and_streams():
    with _client() as client:
        body = {"messages": [{"role": "user", "content": "hey"}], "max_tokens": 3, "temperature": 0}
        reply = client.post("/v1/chat/completions", json=body)
        assert reply.status_code == 200, reply.text
        data = reply.json()
        # The fake engine echoes the prompt: the templated conversation's first characters.
        assert data["object"] == "chat.completion" and data["choices"][0]["message"]["content"] == "<us"
        assert data["usage"]["completion_tokens"] == 3
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as stream:
            lines = [line for line in stream.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]" and '"role": "assistant"' in lines[0]
        assert '"finish_reason": "length"' in lines[-2]


def test_a_draining_server_refuses_new_requests_with_503_and_fails_readiness():
    with _client(delay=0.02) as client:
        service = client.app.state.service
        assert client.get("/health").status_code == 200
        service.draining = True
        for route, body in (
            ("/generate", {"inputs": "abc", "parameters": {"max_new_tokens": 2}}),
            ("/generate_stream", {"inputs": "abc", "parameters": {"max_new_tokens": 2}}),
            ("/v1/completions", {"prompt": "abc", "max_tokens": 2}),
        ):
            reply = client.post(route, json=body)
            assert reply.status_code == 503, route
            assert reply.json() == {
                "error": "the server is shutting down; retry on another replica",
                "error_type": "generation",
            }
        health = client.get("/health")
        assert health.status_code == 503 and "draining" in health.json()["error"]
        assert client.get("/info").status_code == 200  # metadata and /metrics stay up while draining
        assert client.get("/metrics").status_code == 200
        assert service.active_requests == 0
