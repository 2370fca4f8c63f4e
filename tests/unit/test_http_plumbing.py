"""HTTP plumbing that needs no model: auth, overload, OpenAPI, limits (fake engine)."""

from __future__ import annotations

import json
import threading
import time

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.plan import RopeConfig
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


@pytest.mark.parametrize(
    ("path", "body", "names"),
    [
        # Over the body's bound of values: refused before it is parsed.
        ("/generate", {"inputs": "x", "context": [1] * 350_000}, "more than 262144 values"),
        ("/generate", {"inputs": "x", "parameters": {"stop": [1] * 350_000}}, "more than 262144 values"),
        ("/v1/completions", {"prompt": [[1, "a"]] * 100_000}, "more than 262144 values"),
        # Under it: each list refused by its own bound, or at its first bad item.
        ("/generate", {"inputs": "x", "context": ["a"] * 200_000}, "context: List should have at most 1024 items"),
        ("/generate", {"inputs": "x", "context": [1] * 1000}, "context.0"),
        (
            "/generate",
            {"inputs": "x", "parameters": {"stop": ["a"] * 200_000}},
            "parameters.stop: List should have at most 16",
        ),
        ("/v1/completions", {"prompt": [[1, "a"]] * 1000}, "prompt"),
        ("/generate", {"inputs": "x", **{f"k{i}": 1 for i in range(70_000)}}, "70000 unknown fields"),
        ("/generate", {"inputs": "x", "parameters": {f"k{i}": 1 for i in range(70_000)}}, "parameters: 70000 unknown"),
        (
            "/generate",
            {"inputs": "x", "strategy": {"name": "yarn", **{f"k{i}": 1 for i in range(70_000)}}},
            "strategy: 70000",
        ),
        ("/v1/completions", {"prompt": "x", "logit_bias": {str(i): "x" for i in range(70_000)}}, "logit_bias"),
        ("/v1/chat/completions", {"messages": [{"role": "bogus", "content": 1}] * 50_000}, "messages.0.role"),
    ],
)
def test_a_body_of_many_bad_items_gets_a_short_error_at_once(path, body, names):
    """One error per bad item made a 700 KB body a 16.7 MB reply after 8 s, the event loop held."""
    with _client() as client:
        started = time.monotonic()
        reply = client.post(path, json=body)
        took = time.monotonic() - started
        assert reply.status_code == 422, reply.text[:500]
        assert set(reply.json()) == {"error", "error_type"} and names in reply.json()["error"]
        assert len(reply.content) < 4096 and took < 2.0, (len(reply.content), took)


def test_validation_errors_are_capped_with_a_count_of_the_rest():
    from server.http.errors import describe_validation_errors

    errors = [{"loc": ("body", f"field{i}"), "msg": "x" * 1000, "type": "missing"} for i in range(25)]
    message = describe_validation_errors(errors)
    assert message.count("field") == 10 and message.endswith("; and 15 more errors")
    assert len(message) < 10 * 340  # each line cut to 300 characters and its length


def test_an_nbce_request_with_more_documents_than_rows_is_refused_before_tokenizing():
    with _client() as client:
        body = {"inputs": "Q?", "strategy": "nbce", "context": [f"d{i}" for i in range(1000)]}
        started = time.monotonic()
        reply = client.post("/generate", json=body)
        assert reply.status_code == 422, reply.text
        assert reply.json()["error"].startswith("context: ") and "1001 rows" in reply.json()["error"]
        assert time.monotonic() - started < 2
        many = client.post("/generate", json={**body, "context": [f"d{i}" for i in range(100_000)]})
        assert many.status_code == 422 and "at most 1024 items" in many.json()["error"], many.text


def test_a_stop_string_is_one_sequence_of_any_length_and_the_limit_counts_a_lists_items():
    with _client() as client:
        long_stop = {"prompt": "abc", "max_tokens": 2, "stop": "a stop sequence of forty characters long"}
        assert client.post("/v1/completions", json=long_stop).status_code == 200
        assert client.post("/v1/completions", json={**long_stop, "stop": [long_stop["stop"]] * 16}).status_code == 200
        many = client.post("/v1/completions", json={**long_stop, "stop": ["x"] * 17})
        assert many.status_code == 422 and "stop" in many.json()["error"] and "16" in many.json()["error"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_model_this_server_does_not_serve_is_a_404(path):
    body = {"max_tokens": 2, "temperature": 0}
    body |= {"prompt": "abc"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    with _client() as client:
        for model in ("gpt-4", "x" * 200_000):
            reply = client.post(path, json={**body, "model": model})
            assert reply.status_code == 404, reply.text[:300]
            # OpenAI's and vLLM's error shape, which their clients branch on (openai.NotFoundError).
            error = reply.json()["error"]
            assert set(reply.json()) == {"error"} and len(reply.content) < 500
            assert (error["type"], error["param"], error["code"]) == ("NotFoundError", "model", 404)
            assert error["message"].startswith("The model `") and "does not exist" in error["message"]
        for model in ("fake", None, ""):  # the served name, or none: the served model
            reply = client.post(path, json={**body, "model": model})
            assert reply.status_code == 200 and reply.json()["model"] == "fake", reply.text
        streamed = client.post(path, json={**body, "model": "gpt-4", "stream": True})
        assert streamed.status_code == 404
    with _client(served_model_name="house-model") as client:
        assert client.post(path, json={**body, "model": "house-model"}).json()["model"] == "house-model"
        assert client.post(path, json={**body, "model": "fake"}).status_code == 404


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_stream_options_need_stream(path):
    body = {"max_tokens": 2, "stream_options": {"include_usage": True}}
    body |= {"prompt": "abc"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    with _client() as client:
        reply = client.post(path, json=body)
        assert reply.status_code == 422 and reply.json()["error"].startswith("stream_options: "), reply.text
        assert client.post(path, json={**body, "stream": True}).status_code == 200


def test_echo_with_a_multi_row_strategy_is_refused_with_or_without_logprobs():
    with _client() as client:
        body = {"prompt": "Q?", "max_tokens": 1, "echo": True, "strategy": "nbce", "context": ["one", "two"]}
        for extra in ({}, {"logprobs": 1}):
            reply = client.post("/v1/completions", json={**body, **extra})
            assert reply.status_code == 422 and reply.json()["error"].startswith("echo: "), reply.text


def test_tgi_truncate_keeps_the_last_tokens_of_the_prompt():
    with _client() as client:  # the fake engine echoes the prompt's bytes
        params = {"max_new_tokens": 3, "details": True}
        reply = client.post("/generate", json={"inputs": "abcdef", "parameters": {**params, "truncate": 3}}).json()
        assert reply["generated_text"] == "def" and reply["details"]["input_length"] == 3
        cut = {"inputs": "xyz", "context": ["one", "two"], "parameters": {**params, "truncate": 4}}
        assert client.post("/generate", json=cut).json()["generated_text"] == "\nxy"  # of "one\n\ntwo\n\nxyz"
        longer = client.post("/generate", json={"inputs": "abc", "parameters": {**params, "truncate": 50}}).json()
        assert longer["generated_text"] == "abc" and longer["details"]["input_length"] == 3


def test_tgi_return_full_text_puts_the_prompt_before_the_generated_text():
    with _client() as client:
        body = {"inputs": "abc", "context": "doc", "parameters": {"max_new_tokens": 2, "return_full_text": True}}
        assert client.post("/generate", json=body).json()["generated_text"] == "doc\n\nabcdo"
        with client.stream("POST", "/generate_stream", json=body) as stream:
            events = [json.loads(line[5:]) for line in stream.iter_lines() if line.startswith("data:")]
        assert events[-1]["generated_text"] == "doc\n\nabcdo"
        plain = {**body, "parameters": {"max_new_tokens": 2}}
        assert client.post("/generate", json=plain).json()["generated_text"] == "do"


def test_tgi_top_n_tokens_reports_the_likeliest_tokens_at_each_position():
    with _client() as client:
        body = {"inputs": "abc", "parameters": {"max_new_tokens": 2, "details": True, "top_n_tokens": 2}}
        details = client.post("/generate", json=body).json()["details"]
        assert [[t["text"] for t in top] for top in details["top_tokens"]] == [["a", "b"], ["b", "c"]]
        assert all(top[0]["logprob"] >= top[1]["logprob"] for top in details["top_tokens"])
        with client.stream("POST", "/generate_stream", json=body) as stream:
            events = [json.loads(line[5:]) for line in stream.iter_lines() if line.startswith("data:")]
        assert [[t["id"] for t in e["top_tokens"]] for e in events] == [[97, 98], [98, 99]]
        without = {**body, "parameters": {"max_new_tokens": 2, "details": True}}
        assert "top_tokens" not in client.post("/generate", json=without).json()["details"]
        nbce = {**body, "strategy": "nbce", "context": ["one", "two"]}
        refused = client.post("/generate", json=nbce)
        assert refused.status_code == 422 and refused.json()["error"].startswith("parameters.top_n_tokens: ")


def test_tgi_typical_p_is_refused_not_ignored():
    with _client() as client:
        reply = client.post("/generate", json={"inputs": "abc", "parameters": {"typical_p": 0.5}})
        assert reply.status_code == 422 and reply.json()["error"].startswith("parameters.typical_p: "), reply.text
        assert "not supported" in reply.json()["error"]
        unset = {"inputs": "abc", "parameters": {"typical_p": None, "max_new_tokens": 2}}
        assert client.post("/generate", json=unset).status_code == 200


@pytest.fixture
def live_server():
    """The app with the fake engine under a real uvicorn (a raw socket needs a real server), its
    body timeout short."""
    import socket

    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = create_app(Settings(body_timeout_s=0.5), fake_service_factory())
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield port
    server.should_exit = True
    thread.join(timeout=10)


def test_a_body_that_stops_half_way_gets_408_and_the_connection_closes(live_server):
    import socket

    with socket.create_connection(("127.0.0.1", live_server), timeout=10) as conn:
        body = b'{"inputs": "abc", "parameters": {"max_new_tokens": 2}}'
        head = f"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        started = time.monotonic()
        conn.sendall(head.encode() + body[:10])  # and then nothing
        reply = b""
        while chunk := conn.recv(65536):  # until the server closes the connection
            reply += chunk
        took = time.monotonic() - started
    assert reply.startswith(b"HTTP/1.1 408 ") and b"connection: close" in reply.lower(), reply[:300]
    error = json.loads(reply.split(b"\r\n\r\n", 1)[1])
    assert error["error_type"] == "validation" and "ROPESERVE_BODY_TIMEOUT_S" in error["error"]
    assert 0.4 < took < 3  # closed with the reply, not after uvicorn's keep-alive timeout (5 s)
    # A body that arrives in time is served, also one sent in pieces.
    with socket.create_connection(("127.0.0.1", live_server), timeout=10) as conn:
        conn.sendall(head.encode() + body[:10])
        time.sleep(0.2)
        conn.sendall(body[10:])
        assert conn.recv(65536).startswith(b"HTTP/1.1 200 ")
