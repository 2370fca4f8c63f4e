"""Strategy presets (ROPESERVE_PRESETS, `model`), dry runs and /tokenize: parsing and HTTP plumbing
on the fake engine. The features themselves run on the real engine in tests/e2e/test_presets.py."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.http.presets import BUILTIN_PRESETS, PresetError, parse_presets
from server.plan import RopeConfig
from server.settings import Settings
from tests.support.fake_engine import FakeEngine, fake_service_factory
from tests.support.metrics_text import scrape

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def _client(engine: FakeEngine | None = None, **settings) -> TestClient:
    return TestClient(create_app(Settings(**settings), fake_service_factory(engine=engine)))


def test_presets_parse_from_json_or_a_file(tmp_path):
    assert parse_presets(None) == {} and parse_presets("  ") == {}
    given = {"smollm2-32k": {"name": "dca"}, "plain": "native"}
    assert parse_presets(json.dumps(given)) == given
    path = tmp_path / "presets.json"
    path.write_text(json.dumps(given))
    assert parse_presets(str(path)) == given


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("{not json", "not valid JSON"),
        ("/nowhere/presets.json", "neither a JSON object nor a readable file"),
        ('{"a": 3}', "preset `a`: a strategy is a name or an object with a `name`"),
        ('{"a": {"factor": 2}}', "preset `a`"),
        ('{"": "dca"}', "preset ids must be"),
    ],
)
def test_a_bad_presets_setting_names_the_setting_and_the_preset(value, says):
    with pytest.raises(PresetError) as refused:
        parse_presets(value)
    assert str(refused.value).startswith("ROPESERVE_PRESETS: ") and says in str(refused.value)


def test_the_setting_is_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("ROPESERVE_PRESETS", '{"long": {"name": "dca"}}')
    monkeypatch.setenv("ROPESERVE_BUILTIN_PRESETS", "false")
    settings = Settings()
    assert parse_presets(settings.presets) == {"long": {"name": "dca"}} and settings.builtin_presets is False


def test_models_lists_the_served_model_and_every_preset():
    with _client(presets='{"fake-32k": {"name": "dca"}}') as client:
        cards = {card["id"]: card for card in client.get("/v1/models").json()["data"]}
    builtin = {f"fake-{suffix}" for suffix in BUILTIN_PRESETS}
    assert set(cards) == {"fake", "fake-32k", *builtin}
    assert cards["fake"]["max_model_len"] == 64 and cards["fake"]["strategy"] is None
    assert cards["fake-32k"]["strategy"] == {"name": "dca"} and cards["fake-32k"]["parent"] == "fake"
    assert cards["fake-self_extend"]["strategy"] == {"name": "self_extend"}
    with _client(builtin_presets=False) as client:
        assert [card["id"] for card in client.get("/v1/models").json()["data"]] == ["fake"]


@pytest.mark.parametrize(
    ("presets", "says"),
    [('{"x": {"name": "nope"}}', "preset `x`: "), ('{"fake": "native"}', "the served model's own name")],
)
def test_a_preset_the_server_cannot_serve_stops_it_at_start(presets, says):
    with pytest.raises(PresetError, match=says), _client(presets=presets):
        pass


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_preset_picks_its_strategy_and_is_echoed(path):
    body = {"prompt": "abc", "max_tokens": 2} if path == "/v1/completions" else CHAT
    with _client(presets='{"house-yarn": {"name": "yarn", "factor": 2}}') as client:
        reply = client.post(path, json={**body, "model": "house-yarn"}).json()
        assert reply["model"] == "house-yarn" and reply["strategy"]["name"] == "yarn"
        assert reply["strategy"]["factor"] == 2
        same = client.post(path, json={**body, "model": "house-yarn", "strategy": {"name": "yarn", "factor": 2}})
        assert same.status_code == 200
        builtin = client.post(path, json={**body, "model": "fake-rerope"}).json()
        assert builtin["strategy"]["name"] == "rerope" and builtin["model"] == "fake-rerope"


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_preset_with_a_different_strategy_is_a_422_naming_both(path):
    body = {"prompt": "abc", "max_tokens": 2} if path == "/v1/completions" else CHAT
    with _client() as client:
        reply = client.post(path, json={**body, "model": "fake-dca", "strategy": "yarn"})
    assert reply.status_code == 422 and reply.json()["error_type"] == "validation"
    message = reply.json()["error"]
    assert message.startswith("strategy: ") and "`fake-dca`" in message and '"dca"' in message and '"yarn"' in message


def test_a_dry_run_answers_what_would_run_and_runs_nothing():
    body = {"inputs": "abc", "parameters": {"max_new_tokens": 3}, "strategy": "auto", "dry_run": True}
    with _client() as client:
        before = scrape(client, "ropeserve_requests_total", strategy="auto", status="success") or 0
        for route in ("/generate", "/generate_stream", "/"):
            reply = client.post(route, json=body)
            assert reply.status_code == 200 and reply.headers["content-type"] == "application/json", route
            plan = reply.json()
            assert plan["dry_run"] is True and plan["admitted"] is True and plan["refusal"] is None
            assert plan["strategy"]["name"] == "auto" and plan["strategy"]["chosen"] == {"name": "native"}
            assert "fit the native window" in plan["strategy"]["reason"]
            assert (plan["rows"], plan["prompt_tokens"], plan["max_new_tokens"]) == (1, 3, 3)
            assert plan["max_total_tokens"] == 64 and plan["kv_tokens"] == 6 and plan["kv_capacity_tokens"] == 4096
        openai = client.post("/v1/completions", json={"prompt": "abc", "model": "fake-auto", "dry_run": True}).json()
        assert openai["model"] == "fake-auto" and openai["strategy"]["chosen"] == {"name": "native"}
        streamed = client.post("/v1/chat/completions", json={**CHAT, "dry_run": True, "stream": True})
        assert streamed.json()["dry_run"] is True
        assert (scrape(client, "ropeserve_requests_total", strategy="auto", status="success") or 0) == before
        too_long = client.post("/generate", json={**body, "inputs": "y" * 100, "strategy": "native"})
        assert too_long.status_code == 422 and "64" in too_long.json()["error"]


class BusyEngine(FakeEngine):
    """Every RoPE slot is held by other configurations."""

    def can_admit(self, rope: RopeConfig) -> bool:
        return rope.is_native


def test_a_dry_run_says_when_the_request_would_not_be_admitted_now():
    with _client(engine=BusyEngine()) as client:
        body = {"inputs": "x", "parameters": {"max_new_tokens": 2}, "strategy": "yarn", "dry_run": True}
        plan = client.post("/generate", json=body).json()
        assert plan["admitted"] is False and "RoPE slot" in plan["refusal"]
        assert client.post("/generate", json={**body, "dry_run": False}).status_code == 429


def test_tokenize_and_detokenize_in_vllms_shapes():
    with _client() as client:
        counted = client.post("/tokenize", json={"prompt": "abc", "context": "doc", "return_token_strs": True}).json()
        assert counted == {
            "count": 8,
            "max_model_len": 64,
            "tokens": list(b"doc\n\nabc"),
            "token_strs": list("doc\n\nabc"),
        }
        chat = client.post("/tokenize", json={"messages": CHAT["messages"], "model": "fake-dca"}).json()
        assert chat["tokens"] == list(b"<user>hi\n<assistant>") and set(chat) == {"count", "max_model_len", "tokens"}
        assert client.post("/detokenize", json={"tokens": counted["tokens"]}).json() == {"prompt": "doc\n\nabc"}
        unknown = client.post("/tokenize", json={"prompt": "abc", "model": "gpt-4"})
        assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "model"
        bad = client.post("/detokenize", json={"tokens": [1, 999]})
        assert bad.status_code == 422 and bad.json()["error"].startswith("tokens: token id 999")
        neither = client.post("/tokenize", json={"text": "abc"})
        assert neither.status_code == 422 and "prompt" in neither.json()["error"]


class CountingEngine(FakeEngine):
    """Counts how often the service asks whether it refuses a RoPE configuration."""

    def __init__(self) -> None:
        super().__init__()
        self.refusals_asked: list[str] = []

    def refuse_rope(self, rope: RopeConfig) -> str | None:
        self.refusals_asked.append(rope.label())
        return None


@pytest.mark.parametrize(
    "strategy", ["yarn", "auto", {"name": "auto", "scoring": [{"name": "self_extend", "group": 2}]}]
)
def test_a_requests_rope_configuration_is_asked_of_the_engine_once(strategy):
    engine = CountingEngine()
    with _client(engine=engine) as client:
        engine.refusals_asked.clear()  # start-up planned each preset once
        body = {"prompt": "y" * 60, "max_tokens": 8, "echo": True, "logprobs": 0, "strategy": strategy}
        assert client.post("/v1/completions", json=body).status_code == 200
    assert len(engine.refusals_asked) == len(set(engine.refusals_asked)) == 1, engine.refusals_asked
