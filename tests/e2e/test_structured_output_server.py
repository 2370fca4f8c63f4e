"""Structured output on the real server: every route, real clients, every strategy family, bad input.

The 60 extraction schemas (tests/support/structured_cases.py) run once each in the default tier,
spread over the strategy families (native, a RoPE scaling, a window strategy, dca, nbce, auto,
case i on family i mod 6); the long tier runs every schema on every family, and reads a ~12k-token
document under `auto`. Window strategies and dca are given small windows, so that these short
prompts run through their attention paths rather than being planned as native.
"""

from __future__ import annotations

import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import httpx
import pytest
from huggingface_hub import InferenceClient
from jsonschema import Draft202012Validator, FormatChecker
from openai import OpenAI
from pydantic import BaseModel

from tests.support.documents import report
from tests.support.sse import stream_events
from tests.support.structured_cases import CASES, INSTRUCTION, SchemaCase

pytestmark = [pytest.mark.engine, pytest.mark.default_tier]

MODEL = "SmolLM2-135M-Instruct"
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "city": {"type": "string", "enum": ["Paris", "London", "Rome"]},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
QUESTION = "Marie Curie was 66 years old and lived in Paris. Extract the person as JSON."
# Strategy families, each with the members a case may run under (case i: family i mod 6).
FAMILIES: dict[str, list[Any]] = {
    "native": ["native"],
    "rope": [
        {"name": "yarn", "factor": 2},
        {"name": "linear", "factor": 2},
        {"name": "ntk", "factor": 2},
        {"name": "llama3", "factor": 2},
        "dynamic_ntk",
    ],
    "window": [
        {"name": "rerope", "window": 128},
        {"name": "leaky_rerope", "window": 128, "leak": 8},
        {"name": "self_extend", "window": 128, "group": 4},
    ],
    "scheme": [
        {"name": "dca", "chunk_size": 256, "local_window": 64},
        {"name": "string", "shift": 128, "local_window": 16},
    ],
    "nbce": ["nbce"],
    "auto": ["auto"],
}
# A case's output is cut at this many tokens (finish_reason "length"): the schemas need ~20-110.
MAX_TOKENS = 192
# Of the cases, at least this share must finish by their grammar (the model closes its JSON).
MIN_FINISHED = 0.8


def response_format(schema: dict[str, Any], name: str = "extraction") -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def validates(schema: dict[str, Any], text: str) -> None:
    Draft202012Validator(schema, format_checker=FormatChecker()).validate(json.loads(text))


def case_body(case: SchemaCase, strategy: Any) -> dict[str, Any]:
    """A chat request for `case`: the document in the message, or as NBCE's documents (one per sentence)."""
    name = strategy if isinstance(strategy, str) else strategy["name"]
    body: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "strategy": strategy,
        "response_format": response_format(case.schema),
        "messages": [{"role": "user", "content": case.prompt()}],
    }
    if name == "nbce":
        body["context"] = [s.strip() + "." for s in case.document.split(". ") if s.strip()]
        body["messages"] = [{"role": "user", "content": INSTRUCTION}]
    return body


def run_cases(base_url: str, runs: list[tuple[SchemaCase, Any]]) -> list[tuple[str, str, str | None]]:
    """Each (case, strategy) as a chat request, several at once; (case, finish_reason, why invalid)."""

    def one(run: tuple[SchemaCase, Any]) -> tuple[str, str, str | None]:
        case, strategy = run
        with httpx.Client(base_url=base_url, timeout=900) as client:
            reply = client.post("/v1/chat/completions", json=case_body(case, strategy))
        label = f"{case.name} under {json.dumps(strategy)}"
        assert reply.status_code == 200, f"{label}: {reply.status_code} {reply.text[:300]}"
        choice = reply.json()["choices"][0]
        problem = None
        if choice["finish_reason"] == "stop":
            try:
                validates(case.schema, choice["message"]["content"])
            except Exception as exc:  # noqa: BLE001 - reported below with the case
                problem = f"{type(exc).__name__}: {str(exc)[:200]} in {choice['message']['content'][:300]!r}"
        return label, choice["finish_reason"], problem

    with ThreadPoolExecutor(max_workers=12) as pool:
        return list(pool.map(one, runs))


def check_cases(results: list[tuple[str, str, str | None]]) -> None:
    finished = [r for r in results if r[1] == "stop"]
    invalid = [(label, problem) for label, _, problem in finished if problem is not None]
    assert invalid == [], invalid
    assert len(finished) >= MIN_FINISHED * len(results), [r[:2] for r in results if r[1] != "stop"]
    print(f"\n{len(finished)}/{len(results)} finished by their grammar, all valid")


def spread() -> list[tuple[SchemaCase, Any]]:
    families = list(FAMILIES.values())
    return [(case, families[i % 6][(i // 6) % len(families[i % 6])]) for i, case in enumerate(CASES)]


def test_every_schema_validates_over_the_strategy_families(base_url):
    """Every third group of six schemas, each group spread over the six families; every schema on
    every family is the long tier's test below."""
    assert len(CASES) >= 50
    check_cases(run_cases(base_url, [run for i, run in enumerate(spread()) if (i // 6) % 3 == 0]))


@pytest.mark.long_tier
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_schema_validates_on_every_family(base_url, family):
    members = FAMILIES[family]
    check_cases(run_cases(base_url, [(case, members[i % len(members)]) for i, case in enumerate(CASES)]))


# --- the routes ----------------------------------------------------------------------------------


def test_chat_json_schema_streamed_or_not(http):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 64,
        "temperature": 0,
        "response_format": response_format(PERSON),
    }
    whole = http.post("/v1/chat/completions", json=body).json()
    text = whole["choices"][0]["message"]["content"]
    assert whole["choices"][0]["finish_reason"] == "stop"
    validates(PERSON, text)
    events = stream_events(http, "/v1/chat/completions", {**body, "stream": True})
    chunks = [e for e in events if isinstance(e, dict) and e.get("choices")]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == text
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_completions_json_schema_and_json_object(http):
    prompt = f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    body = {"prompt": prompt, "max_tokens": 64, "temperature": 0, "response_format": response_format(PERSON)}
    whole = http.post("/v1/completions", json=body).json()["choices"][0]
    validates(PERSON, whole["text"])
    events = stream_events(http, "/v1/completions", {**body, "stream": True})
    assert "".join(e["choices"][0]["text"] for e in events if isinstance(e, dict) and e.get("choices")) == whole["text"]
    obj = http.post(
        "/v1/completions", json={**body, "response_format": {"type": "json_object"}, "max_tokens": 96}
    ).json()["choices"][0]
    if obj["finish_reason"] == "stop":
        assert isinstance(json.loads(obj["text"]), dict)


@pytest.mark.parametrize(
    ("structured", "check"),
    [
        ({"regex": r"[0-9]{3}-[0-9]{4}"}, lambda t: len(t) == 8 and t[3] == "-" and (t[:3] + t[4:]).isdigit()),
        ({"choice": ["Paris", "London", "Rome"]}, lambda t: t in ("Paris", "London", "Rome")),
        ({"grammar": 'root ::= ("yes" | "no") "."'}, lambda t: t in ("yes.", "no.")),
        ({"grammar": 'start: ANSWER\nANSWER: "north" | "south"'}, lambda t: t in ("north", "south")),
        ({"json": PERSON}, lambda t: validates(PERSON, t) is None),
    ],
)
def test_vllms_structured_outputs(http, structured, check):
    body = {
        "prompt": f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n",
        "max_tokens": 64,
        "temperature": 0,
        "structured_outputs": structured,
    }
    choice = http.post("/v1/completions", json=body).json()["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    assert check(choice["text"]), choice["text"]


def test_tgi_grammar_on_every_tgi_route(http):
    grammar = {"type": "json", "value": PERSON}
    params = {"max_new_tokens": 64, "grammar": grammar, "details": True, "decoder_input_details": True}
    body = {"inputs": QUESTION, "parameters": params}
    reply = http.post("/generate", json=body).json()
    assert reply["details"]["finish_reason"] == "eos_token"
    validates(PERSON, reply["generated_text"])
    assert len(reply["details"]["prefill"]) == reply["details"]["input_length"]  # the prompt's logprobs too
    as_schema = {"type": "json_schema", "value": {"name": "person", "schema": PERSON}}
    listed = http.post("/", json={**body, "parameters": {**params, "grammar": as_schema}}).json()
    assert listed[0]["generated_text"] == reply["generated_text"]
    regex = {
        "inputs": "A phone number:",
        "parameters": {"max_new_tokens": 16, "grammar": {"type": "regex", "value": r"\d{3}-\d{4}"}},
    }
    events = stream_events(http, "/generate_stream", regex)
    final = events[-1]
    assert final["details"]["finish_reason"] == "eos_token" and len(final["generated_text"]) == 8


def test_a_short_max_tokens_finishes_by_length(http):
    body = {
        "inputs": QUESTION,
        "parameters": {"max_new_tokens": 4, "details": True, "grammar": {"type": "json", "value": PERSON}},
    }
    reply = http.post("/generate", json=body).json()
    assert reply["details"]["finish_reason"] == "length" and reply["generated_text"].startswith("{")


# --- real clients --------------------------------------------------------------------------------


class Person(BaseModel):
    name: str
    age: int
    city: Literal["Paris", "London", "Rome"]


def test_openai_client_parses_into_a_pydantic_model_under_nbce_by_preset(base_url):
    client = OpenAI(base_url=f"{base_url}/v1", api_key="unused")
    parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
    completion = parse(
        model=MODEL,
        messages=[{"role": "user", "content": "Extract the person from the documents as JSON."}],
        response_format=Person,
        max_tokens=64,
        temperature=0,
        extra_body={"strategy": "nbce", "context": ["Marie Curie lived in Paris.", "Marie Curie was 66 years old."]},
    )
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(completion.choices[0].message.parsed, Person)
    by_preset = client.chat.completions.create(
        model=f"{MODEL}-dca",
        messages=[{"role": "user", "content": QUESTION}],
        response_format=response_format(PERSON),  # type: ignore[arg-type]
        max_tokens=64,
        temperature=0,
    )
    validates(PERSON, by_preset.choices[0].message.content or "")


def test_huggingface_hub_passes_the_grammar(base_url):
    client = InferenceClient(base_url)
    text = client.text_generation(QUESTION, max_new_tokens=64, grammar={"type": "json", "value": PERSON})
    validates(PERSON, text)
    streamed = client.text_generation(
        "A phone number:",
        max_new_tokens=16,
        grammar={"type": "regex", "value": r"\d{3}-\d{4}"},
        stream=True,
        details=True,
    )
    final = list(streamed)[-1]
    assert final.details is not None and final.details.finish_reason == "eos_token"
    assert len(final.generated_text or "") == 8


# --- bad input -----------------------------------------------------------------------------------

BAD_SCHEMAS: list[Any] = [
    {"type": "nope"},
    {"type": "object", "properties": {"a": {"type": "integer", "multipleOf": 2}}},
    {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}},
    {"$ref": "https://example.org/schema.json"},
    {"type": "integer", "minimum": 10, "maximum": 1},
    {"type": "string", "format": "credit-card"},
    {"type": "object", "properties": {"a": {}}, "required": ["a", "b"]},
    {"oneOf": [{"type": "integer"}, {"type": "string"}]},
    {"type": "array", "items": {"type": "integer"}, "minItems": 5, "maxItems": 2},
    {"type": "string", "pattern": "(unclosed"},
    {"$ref": "#"},  # compiles, and matches nothing
    {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(3000)}},
]
BAD_REGEXES = ["(a", "[z-a]", "a{5,2}", "\\", "(?P<x>a)(?P=y)", "a" * 40_000]
BAD_GRAMMARS = [
    'root ::= "a" |',
    "root ::= missing",
    "root ::= root",
    "start: (",
    'root ::= "a"\nroot ::= "b"',
    "x" * 40_000,
]


def test_no_malformed_constraint_is_a_5xx_or_harms_the_engine(http):
    refusals = []
    for schema in BAD_SCHEMAS:
        refusals.append(
            http.post(
                "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "x"}], "response_format": response_format(schema)},
            )
        )
        refusals.append(
            http.post("/generate", json={"inputs": "x", "parameters": {"grammar": {"type": "json", "value": schema}}})
        )
    for regex in BAD_REGEXES:
        refusals.append(http.post("/v1/completions", json={"prompt": "x", "structured_outputs": {"regex": regex}}))
        refusals.append(
            http.post("/generate", json={"inputs": "x", "parameters": {"grammar": {"type": "regex", "value": regex}}})
        )
    for grammar in BAD_GRAMMARS:
        refusals.append(http.post("/v1/completions", json={"prompt": "x", "structured_outputs": {"grammar": grammar}}))
    refusals.append(
        http.post(
            "/v1/completions",
            json={"prompt": "x", "echo": True, "logprobs": 1, "response_format": {"type": "json_object"}},
        )
    )
    statuses = {r.status_code for r in refusals}
    assert statuses == {422}, [(r.status_code, r.text[:200]) for r in refusals if r.status_code != 422]
    named = ("response_format", "parameters.grammar", "structured_outputs", "echo")
    assert all(r.json()["error"].startswith(named) for r in refusals), [r.json()["error"] for r in refusals]
    assert http.get("/health").status_code == 200
    after = http.post(
        "/generate",
        json={"inputs": QUESTION, "parameters": {"max_new_tokens": 48, "grammar": {"type": "json", "value": PERSON}}},
    )
    assert after.status_code == 200
    validates(PERSON, after.json()["generated_text"])


@pytest.mark.long_tier
def test_a_schema_past_the_compile_bound_is_refused_and_health_answers_meanwhile(http, base_url):
    # Bounded repetitions cost the grammar compiler seconds each: this one passes the 10 s bound.
    # Its title makes it new to the server's verdict cache, whatever ran before on the same server.
    properties = {f"s{i}": {"type": "string", "maxLength": 150 + i} for i in range(6)}
    slow = {"title": uuid.uuid4().hex, "type": "object", "properties": properties}
    body = {"inputs": "x", "parameters": {"grammar": {"type": "json", "value": slow}}}
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(lambda: httpx.post(f"{base_url}/generate", json=body, timeout=120))
        waits = []
        while not pending.done():
            started = time.monotonic()
            assert http.get("/health").status_code == 200
            waits.append(time.monotonic() - started)
            time.sleep(0.2)
        reply = pending.result()
    assert reply.status_code == 422 and "longer than 10 s to compile" in reply.json()["error"], reply.text
    assert len(waits) > 20 and max(waits) < 1.0, (len(waits), max(waits))
    again = http.post("/generate", json=body)  # the refusal is remembered: no second compile
    assert again.status_code == 422 and again.elapsed.total_seconds() < 1.0


# --- a long document -----------------------------------------------------------------------------

INVENTORY = {
    "type": "object",
    "properties": {
        "ship": {"type": "string", "maxLength": 16},
        "crates": {"type": "integer", "minimum": 0, "maximum": 1000},
        "port": {"type": "string", "enum": ["Oslo", "Lisbon", "Riga"]},
    },
    "required": ["ship", "crates", "port"],
}


@pytest.mark.long_tier
def test_an_extraction_from_a_12k_token_document_under_auto(http):
    facts = "The harbour master's summary: the ship Aurora unloaded 412 crates at Lisbon."
    document = report(550, seed=32) + "\n\n" + facts + "\n\n" + report(550, seed=33)
    body = {
        "model": MODEL,
        "messages": [
            {"role": "user", "content": "From the harbour master's summary, extract the ship, crates and port."}
        ],
        "context": document,
        "strategy": "auto",
        "max_tokens": 64,
        "temperature": 0,
        "response_format": response_format(INVENTORY),
    }
    reply = http.post("/v1/chat/completions", json=body).json()
    assert 11_000 <= reply["usage"]["prompt_tokens"] <= 14_000, reply["usage"]
    assert reply["strategy"]["name"] == "auto" and reply["choices"][0]["finish_reason"] == "stop", reply
    validates(INVENTORY, reply["choices"][0]["message"]["content"])
    print(f"\nauto chose {reply['strategy'].get('chosen')}: {reply['choices'][0]['message']['content']}")
