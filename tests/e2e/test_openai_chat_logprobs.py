"""Chat completions, prompt logprobs (echo), token-id prompts, TGI prefill details and NBCE on a
plain prompt, against the real server (float32 engine) and, for the logprobs, a plain
transformers forward pass of the same model."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch
from openai import OpenAI
from transformers import AutoModelForCausalLM, AutoTokenizer

from server.ops.model_store import DEFAULT_MODEL_NAME, default_checkpoint_dir

pytestmark = [pytest.mark.engine, pytest.mark.default_tier]

TEXT = (
    "The lighthouse keeper climbed the stairs every evening. From the top he could see the harbour, "
    "the fishing boats coming home and, on clear nights, the lights of the town across the bay."
)
DOCUMENTS = ["An owl lives in the old barn behind the farm.", "A fox crosses the frozen river every morning."]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(default_checkpoint_dir()))


@pytest.fixture(scope="module")
def reference_logprobs(tokenizer):
    """log p(token_i | tokens_<i) of TEXT from transformers in float32 (position 0: none)."""
    model = AutoModelForCausalLM.from_pretrained(str(default_checkpoint_dir()), dtype=torch.float32).eval()
    ids = tokenizer.encode(TEXT)
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0].float()
    logp = logits.log_softmax(-1)
    return ids, [None] + [float(logp[i - 1, ids[i]]) for i in range(1, len(ids))]


@pytest.fixture(scope="module")
def client(base_url: str) -> OpenAI:
    return OpenAI(base_url=f"{base_url}/v1", api_key="unused", timeout=300)


def echo(http: httpx.Client, **body) -> dict:
    reply = http.post("/v1/completions", json={"max_tokens": 1, "temperature": 0, "logprobs": 2, "echo": True, **body})
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_echo_returns_the_prompt_logprobs_of_the_model(http, tokenizer, reference_logprobs):
    ids, expected = reference_logprobs
    data = echo(http, prompt=TEXT)
    choice = data["choices"][0]
    lp = choice["logprobs"]
    # Prompt tokens, then the one generated token (lm-eval drops the last entry).
    assert len(lp["tokens"]) == len(ids) + 1 and data["usage"]["completion_tokens"] == 1
    assert choice["text"].startswith(TEXT)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    got = lp["token_logprobs"][1 : len(ids)]
    assert max(abs(g - e) for g, e in zip(got, expected[1:], strict=True)) < 2e-3
    # Each position's top_logprobs holds the token itself and the 2 likeliest, the best first among them.
    for token, value, top in zip(lp["tokens"][1:], lp["token_logprobs"][1:], lp["top_logprobs"][1:], strict=True):
        assert top[token] == value and 1 <= len(top) <= 3 and max(top.values()) >= value
    offsets = lp["text_offset"]
    assert offsets[0] == 0 and all(b - a == len(t) for a, b, t in zip(offsets, offsets[1:], lp["tokens"], strict=False))


def test_token_id_prompts_and_max_tokens_zero(http, tokenizer, reference_logprobs):
    ids, _ = reference_logprobs
    by_text = echo(http, prompt=TEXT)["choices"][0]["logprobs"]["token_logprobs"]
    for prompt in (ids, [ids]):  # OpenAI's token-id prompt, alone or in a one-element list (lm-eval)
        by_ids = echo(http, prompt=prompt, seed=1234)["choices"][0]["logprobs"]["token_logprobs"]
        assert by_ids == by_text
    only = echo(http, prompt=TEXT, max_tokens=0)
    assert only["choices"][0]["text"] == TEXT and only["usage"]["completion_tokens"] == 0
    assert len(only["choices"][0]["logprobs"]["tokens"]) == len(ids)
    assert only["choices"][0]["logprobs"]["token_logprobs"] == by_text[: len(ids)]


def test_echo_under_a_rope_strategy_and_streaming(http, base_url, reference_logprobs):
    ids, _ = reference_logprobs
    native = echo(http, prompt=TEXT)["choices"][0]["logprobs"]["token_logprobs"]
    scaled = echo(http, prompt=TEXT, strategy={"name": "linear", "factor": 4})
    lp = scaled["choices"][0]["logprobs"]["token_logprobs"]
    assert scaled["strategy"]["name"] == "linear" and len(lp) == len(native)
    assert any(abs(a - b) > 0.05 for a, b in zip(native[1:], lp[1:], strict=True)), "linear x4 reads other positions"
    # Streaming: the first chunk carries the prompt and its logprobs; the stream adds up to the reply.
    body = {"prompt": TEXT, "max_tokens": 4, "temperature": 0, "logprobs": 1, "echo": True, "stream": True}
    chunks = []
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=120) as reply:
        for line in reply.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    texts = [c["choices"][0]["text"] for c in chunks if c["choices"]]
    assert texts[0].startswith(TEXT)
    first = chunks[0]["choices"][0]["logprobs"]
    assert len(first["tokens"]) >= len(ids) and first["token_logprobs"][: len(ids)] == native[: len(ids)]
    whole = http.post("/v1/completions", json={**body, "stream": False}).json()["choices"][0]
    assert "".join(texts) == whole["text"]


def test_prompt_logprobs_refusals(http):
    cases = [
        ({"prompt": "Which animal?", "echo": True, "logprobs": 1, "strategy": "nbce", "context": DOCUMENTS}, "echo"),
        ({"prompt": [10**7], "max_tokens": 1}, "prompt"),
        ({"prompt": [-1, 5], "max_tokens": 1}, "prompt"),
        ({"prompt": [[1, 2], [3]], "max_tokens": 1}, "prompt"),
        ({"prompt": [], "max_tokens": 1}, "prompt"),
        ({"prompt": [1, 2, 3], "context": "a document", "max_tokens": 1}, "context"),
        ({"prompt": "Hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "Hi", "logprobs": 21}, "logprobs"),
    ]
    for body, field in cases:
        reply = http.post("/v1/completions", json=body)
        assert reply.status_code == 422, (body, reply.text)
        assert reply.json()["error"].startswith(field), reply.json()
    assert http.get("/health").status_code == 200


def test_tgi_decoder_input_details(http, reference_logprobs):
    ids, expected = reference_logprobs
    body = {"inputs": TEXT, "parameters": {"max_new_tokens": 2, "details": True, "decoder_input_details": True}}
    prefill = http.post("/generate", json=body).json()["details"]["prefill"]
    assert [t["id"] for t in prefill] == ids
    assert prefill[0].get("logprob") is None
    assert max(abs(t["logprob"] - e) for t, e in zip(prefill[1:], expected[1:], strict=True)) < 2e-3


@pytest.mark.parametrize(
    "strategy",
    ["native", {"name": "yarn", "factor": 2}, "auto", {"name": "nbce"}],
    ids=["native", "yarn", "auto", "nbce"],
)
def test_openai_chat_client_unchanged(client, http, tokenizer, strategy):
    messages = [{"role": "user", "content": "Which animals are named in the text? Answer briefly."}]
    extra = {"strategy": strategy, "context": DOCUMENTS}
    combined = strategy == {"name": "nbce"}  # tokens of combined rows: no per-token logprobs (422)
    if combined:
        with pytest.raises(openai.UnprocessableEntityError) as refused:
            client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=messages, logprobs=True, extra_body=extra)
        assert refused.value.response.json()["error"].startswith("logprobs")
    reply = client.chat.completions.create(
        model=DEFAULT_MODEL_NAME,
        messages=messages,
        max_tokens=12,
        temperature=0,
        logprobs=not combined,
        top_logprobs=None if combined else 2,
        extra_body=extra,
    )
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert 1 <= reply.usage.completion_tokens <= 12
    if not combined:
        assert reply.usage.completion_tokens == len(choice.logprobs.content)
        for token in choice.logprobs.content:
            assert len(token.top_logprobs) == 2 and token.top_logprobs[0].logprob >= token.top_logprobs[1].logprob
    # The same text as /v1/completions on the model's chat template, the documents before it.
    templated = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    plain = http.post("/v1/completions", json={"prompt": templated, "max_tokens": 12, "temperature": 0, **extra}).json()
    assert plain["choices"][0]["text"] == choice.message.content
    # Streaming, with usage at the end.
    stream = client.chat.completions.create(
        model=DEFAULT_MODEL_NAME,
        messages=messages,
        max_completion_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=extra,
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_chat_refusals_name_the_field(http):
    cases = [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
        ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
        ({"messages": [{"role": "user", "content": "x"}], "strategy": "nope"}, "strategy"),
    ]
    for body, field in cases:
        reply = http.post("/v1/chat/completions", json=body)
        assert reply.status_code == 422, (body, reply.text)
        assert reply.json()["error"].startswith(field), reply.json()


def test_nbce_on_a_plain_prompt_splits_it(http):
    question = "Which animal crosses the river? Answer in one word."
    with_context = http.post(
        "/generate",
        json={
            "inputs": question,
            "context": "\n\n".join(DOCUMENTS),
            "strategy": "nbce",
            "parameters": {"max_new_tokens": 8},
        },
    ).json()
    split = http.post(
        "/v1/completions",
        json={
            "prompt": "\n\n".join(DOCUMENTS) + "\n\n" + question,
            "max_tokens": 8,
            "temperature": 0,
            "strategy": {"name": "nbce", "split": "last_paragraph"},
        },
    ).json()
    assert split["strategy"]["rows"] == with_context["strategy"]["rows"] >= 2
    assert split["choices"][0]["text"] == with_context["generated_text"]
    lines = http.post(
        "/v1/completions",
        json={
            "prompt": " ".join(DOCUMENTS) + "\n" + question,
            "max_tokens": 8,
            "temperature": 0,
            "strategy": {"name": "nbce", "split": "last_line"},
        },
    )
    assert lines.status_code == 200 and lines.json()["strategy"]["split"] == "last_line"
    unsplittable = http.post(
        "/v1/completions", json={"prompt": question, "strategy": {"name": "nbce", "split": "last_paragraph"}}
    )
    assert unsplittable.status_code == 422 and unsplittable.json()["error"].startswith("inputs")
