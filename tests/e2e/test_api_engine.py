"""The HTTP API of CONTRACT.md against the real server (vLLM + bundled SmolLM2)."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from server.ops.model_store import default_checkpoint_dir
from tests.support.sse import stream_events

pytestmark = [pytest.mark.engine, pytest.mark.default_tier]

CHAT = "<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(default_checkpoint_dir()))


def test_generate_answers_and_reports_strategy(http):
    body = {"inputs": CHAT.format(q="What is the capital of France?"), "parameters": {"max_new_tokens": 12}}
    reply = http.post("/generate", json=body)
    assert reply.status_code == 200, reply.text
    data = reply.json()
    assert "Paris" in data["generated_text"]
    assert data["strategy"]["name"] == "native"
    assert "details" not in data or data["details"] is None


def test_greedy_generation_is_deterministic_and_details_match(http, tokenizer):
    body = {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 10, "details": True}}
    first = http.post("/generate", json=body).json()
    second = http.post("/generate", json=body).json()
    assert first["generated_text"] == second["generated_text"]
    details = first["details"]
    assert details["generated_tokens"] == len(details["tokens"]) <= 10
    assert details["finish_reason"] in ("length", "eos_token")
    assert details["input_length"] == len(tokenizer.encode("The capital of France is"))
    ids = [t["id"] for t in details["tokens"] if not t["special"]]
    assert tokenizer.decode(ids) == first["generated_text"]
    assert all(t["logprob"] <= 0 for t in details["tokens"])


def test_context_and_inputs_are_joined_by_blank_lines(http, tokenizer):
    docs = ["Alice keeps a red bicycle.", "Bob owns a green kayak."]
    body = {"inputs": "Who owns the kayak?", "context": docs, "parameters": {"max_new_tokens": 2, "details": True}}
    data = http.post("/generate", json=body).json()
    expected = tokenizer.encode("Alice keeps a red bicycle.\n\nBob owns a green kayak.\n\nWho owns the kayak?")
    assert data["details"]["input_length"] == len(expected)
    one = http.post("/generate", json={**body, "context": "\n\n".join(docs)}).json()
    assert one["details"]["input_length"] == len(expected)


def test_stop_sequence_ends_generation(http):
    body = {"inputs": "Count: 1, 2, 3,", "parameters": {"max_new_tokens": 30, "stop": [" 6"], "details": True}}
    data = http.post("/generate", json=body).json()
    assert data["details"]["finish_reason"] == "stop_sequence", data
    assert " 6" not in data["generated_text"]


def test_generate_stream_emits_tgi_events(http):
    body = {"inputs": CHAT.format(q="What is the capital of France?"), "parameters": {"max_new_tokens": 12}}
    events = stream_events(http, "/generate_stream", body)
    assert len(events) >= 2
    assert [e["index"] for e in events] == list(range(1, len(events) + 1))
    assert all(e["generated_text"] is None for e in events[:-1])
    last = events[-1]
    assert last["details"]["generated_tokens"] == len(events)
    assert "Paris" in last["generated_text"]
    plain = http.post("/generate", json=body).json()
    assert last["generated_text"] == plain["generated_text"]


def test_compat_route_returns_list_or_stream(http):
    body = {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 5}}
    listed = http.post("/", json=body)
    assert listed.status_code == 200
    assert isinstance(listed.json(), list) and len(listed.json()) == 1
    events = stream_events(http, "/", {**body, "stream": True})
    assert events[-1]["generated_text"] == listed.json()[0]["generated_text"]


def test_openai_completions_plain_and_streamed(http):
    body = {"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0}
    data = http.post("/v1/completions", json=body).json()
    assert data["object"] == "text_completion"
    assert data["usage"]["completion_tokens"] <= 6
    events = stream_events(http, "/v1/completions", {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    usage_event = events[-2]
    assert (
        usage_event["choices"] == [] and usage_event["usage"]["completion_tokens"] == data["usage"]["completion_tokens"]
    )
    text = "".join(e["choices"][0]["text"] for e in events[:-2])
    assert text == data["choices"][0]["text"]


def test_info_health_strategies_models(http):
    info = http.get("/info").json()
    assert info["model_id"] == "SmolLM2-135M-Instruct"
    assert info["native_context_window"] == 8192
    assert info["engine"] == "vllm"
    assert info["model_dtype"] == "float32"  # what the test server's engine really runs in
    assert http.get("/health").json() == {"status": "ok"}
    strategies = http.get("/strategies").json()
    native = next(s for s in strategies["strategies"] if s["name"] == "native")
    assert native["parameters_schema"]["type"] == "object"
    assert "vllm" in native["engines"]
    models = http.get("/v1/models").json()
    assert models["data"][0]["max_model_len"] == 8192


def test_tgi_truncate_return_full_text_and_top_n_tokens(http, tokenizer):
    """TGI's meanings: the last `truncate` tokens of the prompt are read (the same as sending them
    as token ids), the prompt comes before the generated text, and the likeliest tokens at each
    position are reported, the greedy token first."""
    text = "Some words nobody needs to read. The capital of France is"
    tail = tokenizer.encode(text)[-6:]
    parameters = {"max_new_tokens": 3, "details": True, "truncate": 6, "return_full_text": True, "top_n_tokens": 2}
    data = http.post("/generate", json={"inputs": text, "parameters": parameters}).json()
    as_ids = http.post("/v1/completions", json={"prompt": tail, "max_tokens": 3, "temperature": 0}).json()
    assert data["details"]["input_length"] == 6
    assert data["generated_text"] == text + as_ids["choices"][0]["text"]
    tops = data["details"]["top_tokens"]
    assert len(tops) == data["details"]["generated_tokens"] and all(len(top) == 2 for top in tops)
    for token, top in zip(data["details"]["tokens"], tops, strict=True):
        assert top[0]["id"] == token["id"] and top[0]["logprob"] >= top[1]["logprob"]
    events = stream_events(http, "/generate_stream", {"inputs": text, "parameters": parameters})
    assert [[t["id"] for t in e["top_tokens"]] for e in events] == [[t["id"] for t in top] for top in tops]
    assert events[-1]["generated_text"] == data["generated_text"]
