"""Strategy by model name, sizing and preview against the real server (vLLM + bundled SmolLM2):
unmodified clients that set only `model` get the preset's strategy; /tokenize and /detokenize
agree with the model's own tokenizer; a dry run says what `auto` would pick, running nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import openai
import pytest
from openai import OpenAI
from transformers import AutoTokenizer

from server.ops.model_store import default_checkpoint_dir
from tests.e2e.test_lm_eval import task_dir
from tests.support.metrics_text import scrape

pytestmark = [pytest.mark.engine, pytest.mark.default_tier]

SERVED = "SmolLM2-135M-Instruct"
DCA = f"{SERVED}-dca"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(default_checkpoint_dir()))


@pytest.fixture
def client(base_url):
    return OpenAI(base_url=f"{base_url}/v1", api_key="unused")


def test_models_lists_the_served_model_and_the_built_in_presets(http):
    cards = {card["id"]: card for card in http.get("/v1/models").json()["data"]}
    assert cards[SERVED]["max_model_len"] == 8192 and cards[SERVED]["strategy"] is None
    for suffix, name in (("dca", "dca"), ("rerope", "rerope"), ("self_extend", "self_extend"), ("auto", "auto")):
        card = cards[f"{SERVED}-{suffix}"]
        assert card["strategy"] == {"name": name} and card["parent"] == SERVED
    # self_extend at its defaults (window 2048, group 4) reaches 26,624 tokens; dca what the engine holds.
    assert cards[f"{SERVED}-self_extend"]["max_model_len"] == 26_624
    assert cards[DCA]["max_model_len"] == http.get("/info").json()["max_context_tokens"]


def test_the_openai_client_setting_only_model_gets_the_presets_strategy(client, http):
    before = scrape(http, "ropeserve_requests_total", strategy="dca", status="success")
    completion = client.completions.create(model=DCA, prompt="The capital of France is", max_tokens=3, temperature=0)
    assert completion.model == DCA and (completion.model_extra or {})["strategy"]["name"] == "dca"
    chat = client.chat.completions.create(model=DCA, messages=QUESTION, max_tokens=3, temperature=0)
    assert chat.model == DCA and (chat.model_extra or {})["strategy"]["name"] == "dca"
    streamed = client.chat.completions.create(model=DCA, messages=QUESTION, max_tokens=3, temperature=0, stream=True)
    assert {chunk.model for chunk in streamed} == {DCA}
    assert scrape(http, "ropeserve_requests_total", strategy="dca", status="success") - before == 3


def test_a_preset_with_another_strategy_is_a_422_naming_both(client):
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        client.chat.completions.create(model=DCA, messages=QUESTION, max_tokens=2, extra_body={"strategy": "yarn"})
    body = refused.value.response.json()
    assert body["error_type"] == "validation" and body["error"].startswith("strategy: ")
    assert f"`{DCA}`" in body["error"] and '"dca"' in body["error"] and '"yarn"' in body["error"]


def test_an_unknown_model_is_a_404_in_openais_shape(client, http):
    with pytest.raises(openai.NotFoundError) as refused:
        client.completions.create(model="gpt-4", prompt="Hi", max_tokens=1)
    assert refused.value.response.json() == {
        "error": {
            "message": f"The model `gpt-4` does not exist. Valid models: `{SERVED}` and its presets (GET /v1/models).",
            "type": "NotFoundError",
            "param": "model",
            "code": 404,
        }
    }
    assert http.post("/tokenize", json={"model": "gpt-4", "prompt": "Hi"}).status_code == 404


def test_tokenize_and_detokenize_agree_with_the_models_tokenizer(http, tokenizer):
    text = "Long documents, asked twice, are not read twice."
    counted = http.post("/tokenize", json={"prompt": text, "return_token_strs": True}).json()
    ids = tokenizer.encode(text)
    assert counted == {
        "count": len(ids),
        "max_model_len": 8192,
        "tokens": ids,
        "token_strs": tokenizer.convert_ids_to_tokens(ids),
    }
    assert http.post("/detokenize", json={"tokens": ids}).json() == {"prompt": text}
    chat = http.post("/tokenize", json={"messages": QUESTION, "model": DCA}).json()
    templated = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    assert chat["tokens"] == tokenizer.encode(templated, add_special_tokens=False)
    assert chat["max_model_len"] == http.get("/info").json()["max_context_tokens"]
    # The count of a generation request's prompt: documents, blank line, prompt.
    with_context = http.post("/tokenize", json={"prompt": "Who?", "context": ["Alice.", "Bob."]}).json()
    assert with_context["tokens"] == tokenizer.encode("Alice.\n\nBob.\n\nWho?")


def test_a_dry_run_of_auto_says_what_it_would_pick_and_runs_nothing(http, tokenizer):
    document = "The grass is green. The sky is blue. " * 1100  # about 10k tokens: past the native window
    body = {"inputs": "What color is the sky?", "context": document, "strategy": "auto", "dry_run": True}
    before = scrape(http, "ropeserve_requests_total", strategy="auto")
    plan = http.post("/generate", json={**body, "parameters": {"max_new_tokens": 8}}).json()
    prompt_tokens = len(tokenizer.encode(document + "\n\nWhat color is the sky?"))
    assert plan["dry_run"] is True and plan["strategy"]["name"] == "auto"
    assert plan["strategy"]["chosen"]["name"] != "native" and str(prompt_tokens + 8) in plan["strategy"]["reason"]
    if plan["rows"] == 1:  # a single-row strategy reads the plain prompt (nbce's rows split the document)
        assert plan["prompt_tokens"] == prompt_tokens
    assert plan["kv_tokens"] == plan["prompt_tokens"] + plan["rows"] * 8
    assert plan["max_total_tokens"] >= prompt_tokens + 8 and plan["admitted"] is True and plan["refusal"] is None
    short = http.post("/v1/chat/completions", json={"messages": QUESTION, "model": f"{SERVED}-auto", "dry_run": True})
    assert short.json()["model"] == f"{SERVED}-auto" and short.json()["strategy"]["chosen"] == {"name": "native"}
    assert scrape(http, "ropeserve_requests_total", strategy="auto") == before


def test_lm_eval_local_chat_completions_with_only_model_set_runs_the_preset(base_url, http, tmp_path):
    before = scrape(http, "ropeserve_requests_total", strategy="dca", status="success")
    model_args = f"model={DCA},base_url={base_url}/v1/chat/completions,tokenizer_backend=None"
    command = [
        sys.executable, "-m", "lm_eval", "run", "--model", "local-chat-completions", "--model_args", model_args,
        "--tasks", "ropeserve_capitals_gen", "--include_path", str(task_dir(tmp_path)), "--apply_chat_template",
        "--output_path", str(tmp_path / "out"),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]
    assert "ropeserve_capitals_gen" in results
    assert scrape(http, "ropeserve_requests_total", strategy="dca", status="success") - before == 3
