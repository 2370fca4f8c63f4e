"""Structured output without an engine: the request fields and what they become, which schemas are
served (and that xgrammar enforces what is served and ignores what is refused), the compile check
(cache, time bound, child restart), the vLLM mapping, and NBCE's grammar state and processor."""

from __future__ import annotations

import asyncio
import doctest
import json
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import ValidationError

import server.engines.output_constraint as output_constraint
import server.structured.fields as fields
import server.structured.json_schema as json_schema
from server.app import create_app
from server.engines.base import OutputConstraint, compile_constraint
from server.engines.grammar_check import CompileVerdict, GrammarWorker
from server.ops.model_store import default_checkpoint_dir
from server.schemas import ChatCompletionRequest, CompletionRequest, GenerateRequest
from server.settings import Settings
from server.structured.compile_check import ConstraintCheck
from server.structured.fields import MAX_CONSTRAINT_CHARS, StructuredOutputs
from server.structured.json_schema import UNSUPPORTED_KEYWORDS, schema_problem
from strategies.base import StrategyError
from strategies.nbce.combine import choose_token, combine
from strategies.nbce.grammar import GrammarCache, GroupGrammar
from strategies.nbce.protocol import Combination, Draw, RowTag, announce, announced
from tests.support.fake_engine import fake_service_factory
from tests.support.structured_cases import CASES

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
}


def test_doc_examples() -> None:
    for module in (fields, json_schema, output_constraint):
        assert doctest.testmod(module).failed == 0


# --- the request fields ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "kind", "source"),
    [
        ({"response_format": {"type": "json_object"}}, "json_object", "response_format"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "p", "schema": PERSON, "strict": True},
                }
            },
            "json",
            "response_format.json_schema.schema",
        ),
        ({"structured_outputs": {"json": PERSON}}, "json", "structured_outputs.json"),
        ({"structured_outputs": {"json": json.dumps(PERSON)}}, "json", "structured_outputs.json"),
        ({"structured_outputs": {"regex": r"\d+"}}, "regex", "structured_outputs.regex"),
        ({"structured_outputs": {"choice": ["yes", 'n"o']}}, "grammar", "structured_outputs.choice"),
        ({"structured_outputs": {"grammar": 'root ::= "a"'}}, "grammar", "structured_outputs.grammar"),
        ({"structured_outputs": {"json_object": True}}, "json_object", "structured_outputs.json_object"),
    ],
)
def test_openai_fields_become_one_constraint(body: dict[str, Any], kind: str, source: str) -> None:
    for request in (
        CompletionRequest.model_validate({"prompt": "x", **body}),
        ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], **body}),
    ):
        constraint = request.constraint()
        assert constraint is not None and (constraint.kind, constraint.source) == (kind, source)
    if kind == "json":
        assert json.loads(constraint.spec) == PERSON


def test_text_response_format_is_no_constraint() -> None:
    assert CompletionRequest.model_validate({"prompt": "x", "response_format": {"type": "text"}}).constraint() is None


def test_choices_become_an_escaped_grammar() -> None:
    constraint = StructuredOutputs.model_validate({"choice": ["yes", 'say "no"', "a\\b\n"]}).constraint()
    assert constraint.spec == 'root ::= "yes" | "say \\"no\\"" | "a\\\\b\\n"'


@pytest.mark.parametrize(
    ("grammar", "kind", "source"),
    [
        ({"type": "json", "value": PERSON}, "json", "parameters.grammar.value"),
        ({"type": "json", "value": json.dumps(PERSON)}, "json", "parameters.grammar.value"),
        ({"type": "json_object", "value": PERSON}, "json", "parameters.grammar.value"),
        ({"type": "json_schema", "value": {"name": "p", "schema": PERSON}}, "json", "parameters.grammar.value.schema"),
        ({"type": "regex", "value": "[a-z]+"}, "regex", "parameters.grammar.value"),
    ],
)
def test_tgi_grammar_becomes_a_constraint(grammar: dict[str, Any], kind: str, source: str) -> None:
    body = GenerateRequest.model_validate({"inputs": "x", "parameters": {"grammar": grammar}})
    assert body.parameters.grammar is not None
    constraint = body.parameters.grammar.constraint()
    assert (constraint.kind, constraint.source) == (kind, source)


def deep_schema(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


WIDE = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(2000)}}

# Each bad field, and words its 422 must hold (the field, and what is wrong).
BAD_FIELDS: list[tuple[dict[str, Any], list[str]]] = [
    ({"response_format": {"type": "json_schema"}}, ["response_format", "json_schema"]),
    ({"response_format": {"type": "xml"}}, ["response_format.type"]),
    ({"response_format": {"type": "json_object", "json_schema": {"name": "a", "schema": {}}}}, ["json_schema"]),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "has space", "schema": PERSON}}},
        ["response_format.json_schema.name"],
    ),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "nope"}}}},
        ["response_format.json_schema", "schema: type", "nope"],
    ),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": deep_schema(20)}}},
        ["response_format.json_schema", "levels", "32"],
    ),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": WIDE}}},
        ["response_format.json_schema", "characters", str(MAX_CONSTRAINT_CHARS)],
    ),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, ["structured_outputs", "exactly one"]),
    ({"structured_outputs": {}}, ["structured_outputs", "exactly one"]),
    ({"structured_outputs": {"json": "{not json"}}, ["structured_outputs", "json: not valid JSON"]),
    ({"structured_outputs": {"json": [1]}}, ["structured_outputs.json"]),
    ({"structured_outputs": {"choice": []}}, ["structured_outputs.choice"]),
    ({"structured_outputs": {"choice": ["a", ""]}}, ["structured_outputs", "choice"]),
    ({"structured_outputs": {"grammar": "  "}}, ["structured_outputs", "grammar"]),
    ({"structured_outputs": {"regex": "a\x00"}}, ["structured_outputs", "regex", "NUL"]),
    ({"structured_outputs": {"json_object": False}}, ["structured_outputs", "json_object"]),
    ({"structured_outputs": {"whitespace_pattern": " "}}, ["structured_outputs.whitespace_pattern"]),
    ({"structured_outputs": {"structural_tag": "{}"}}, ["structured_outputs.structural_tag"]),
    (
        {"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}},
        ["structured_outputs", "not both"],
    ),
    ({"guided_json": PERSON}, ["guided_json", "removed"]),
    ({"guided_regex": "a"}, ["guided_regex", "removed"]),
    ({"ignore_eos": True, "response_format": {"type": "json_object"}}, ["ignore_eos"]),
]


@pytest.mark.parametrize(("bad", "words"), BAD_FIELDS)
def test_bad_openai_fields_are_422_naming_the_field(bad: dict[str, Any], words: list[str]) -> None:
    with TestClient(create_app(Settings(), fake_service_factory())) as client:
        for path, base in (
            ("/v1/completions", {"prompt": "x"}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
        ):
            reply = client.post(path, json={**base, **bad})
            assert reply.status_code == 422, reply.text
            assert all(w in reply.json()["error"] for w in words), reply.json()["error"]


BAD_GRAMMARS: list[tuple[Any, list[str]]] = [
    ({"type": "xml", "value": "a"}, ["parameters.grammar.type"]),
    ({"type": "regex", "value": 3}, ["parameters.grammar", "value", "string"]),
    ({"type": "regex", "value": "x" * (MAX_CONSTRAINT_CHARS + 1)}, ["parameters.grammar", "characters"]),
    ({"type": "json", "value": 3}, ["parameters.grammar", "value", "JSON schema"]),
    ({"type": "json", "value": "[1, 2"}, ["parameters.grammar", "value", "not valid JSON"]),
    ({"type": "json", "value": {"type": "integer", "not": {"const": 1}}}, ["parameters.grammar", "value", "'not'"]),
    ({"type": "json_schema", "value": {"schema": 1}}, ["parameters.grammar", "value"]),
    ({"type": "json_schema", "value": {"schema": PERSON, "strict": True}}, ["parameters.grammar", "strict"]),
    ({"type": "json"}, ["parameters.grammar.value"]),
    ("json", ["parameters.grammar"]),
]


@pytest.mark.parametrize(("grammar", "words"), BAD_GRAMMARS)
def test_bad_tgi_grammar_is_422_naming_the_field(grammar: Any, words: list[str]) -> None:
    with TestClient(create_app(Settings(), fake_service_factory())) as client:
        reply = client.post("/generate", json={"inputs": "x", "parameters": {"grammar": grammar}})
        assert reply.status_code == 422, reply.text
        assert all(w in reply.json()["error"] for w in words), reply.json()["error"]


def test_echo_with_a_constraint_is_refused_naming_echo() -> None:
    with pytest.raises(ValidationError, match="echo: the prompt before a constrained output"):
        CompletionRequest.model_validate({"prompt": "x", "echo": True, "response_format": {"type": "json_object"}})


def test_a_server_without_a_compile_check_refuses_constraints() -> None:
    with TestClient(create_app(Settings(), fake_service_factory())) as client:
        body = {"inputs": "x", "parameters": {"max_new_tokens": 4, "grammar": {"type": "regex", "value": "a+"}}}
        reply = client.post("/generate", json=body)
        assert reply.status_code == 422 and "parameters.grammar.value: structured output is not available" in reply.text


# --- which schemas are served, and why -----------------------------------------------------------


@pytest.mark.parametrize("keyword", sorted(UNSUPPORTED_KEYWORDS))
def test_each_unsupported_keyword_is_refused_where_it_is(keyword: str) -> None:
    sub: dict[str, Any] = {"type": "integer", keyword: {"type": "integer"}}
    if keyword in ("oneOf",):
        sub[keyword] = [{"type": "integer"}]
    if keyword in ("dependentRequired", "dependencies", "dependentSchemas", "patternProperties"):
        sub = {"type": "object", keyword: {"a": ["b"]} if keyword in ("dependentRequired", "dependencies") else {}}
    if keyword in ("minContains", "maxContains"):
        sub = {"type": "array", keyword: 1}
    if keyword in ("$dynamicRef", "$recursiveRef"):
        sub = {keyword: "#"}
    if keyword in ("$dynamicAnchor",):
        sub = {keyword: "a"}
    if keyword == "$recursiveAnchor":
        sub = {keyword: "a"}
    if keyword == "multipleOf":
        sub = {"type": "integer", "multipleOf": 3}
    schema = {"type": "object", "properties": {"x": {"type": "array", "items": sub}}}
    problem = schema_problem(schema)
    assert problem is not None and problem.startswith("properties.x.items: ") and repr(keyword) in problem, problem


DRAFT_04, DRAFT_07 = "http://json-schema.org/draft-04/schema#", "http://json-schema.org/draft-07/schema#"


@pytest.mark.parametrize(
    ("schema", "words"),
    [
        ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, ["uniqueItems"]),
        ({"allOf": [{"type": "integer"}, {"minimum": 3}]}, ["allOf"]),
        ({"type": "object", "properties": {"a": {"$ref": "https://example.org/s.json"}}}, ["properties.a", "$ref"]),
        ({"type": "string", "format": "credit-card"}, ["format", "credit-card"]),
        ({"type": "string", "pattern": "^a+$", "maxLength": 3}, ["pattern", "maxLength"]),
        ({"type": "object", "properties": {"a": {}}, "propertyNames": {"maxLength": 3}}, ["propertyNames"]),
        ({"type": "object", "properties": {"a": {}}, "required": ["a", "b"]}, ["required", "'b'"]),
        ({"$schema": DRAFT_07, "type": "array", "items": [{"type": "integer"}]}, ["items", "prefixItems"]),
        ({"$schema": DRAFT_04, "type": "integer", "minimum": 1, "exclusiveMinimum": True}, ["boolean"]),
        ({"type": "array", "items": [{"type": "integer"}]}, ["items", "is not of type"]),
        ({"type": "object", "required": "a"}, ["required", "array"]),
        ({"$schema": ["not", "a string"], "type": "integer"}, ["$schema", "string"]),
        ({"$schema": 5}, ["$schema", "string"]),
        ({"$schema": "http://json-schema.org/draft-03/schema#", "type": "integer"}, ["draft 3"]),
        (["not", "an object"], ["JSON object"]),
    ],
)
def test_schemas_the_grammar_cannot_enforce_are_refused(schema: Any, words: list[str]) -> None:
    problem = schema_problem(schema)
    assert problem is not None and all(w in problem for w in words), problem


def test_every_case_of_the_suite_is_served() -> None:
    assert len(CASES) >= 50
    assert [case.name for case in CASES if schema_problem(case.schema)] == []


@pytest.fixture(scope="module")
def compiler() -> Any:
    import xgrammar as xgr
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_checkpoint_dir())
    return xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer)))


def accepts(compiler: Any, schema: dict[str, Any], document: str) -> bool:
    import xgrammar as xgr

    matcher = xgr.GrammarMatcher(compile_constraint(compiler, OutputConstraint("json", json.dumps(schema))))
    return bool(matcher.accept_string(document) and matcher.is_completed())


# A served keyword: a document that matches and one that breaks it, as the grammar must tell them apart.
ENFORCED = [
    ({"type": ["integer", "null"]}, "null", '"x"'),
    ({"enum": ["a", 1]}, '"a"', '"b"'),
    ({"const": "k"}, '"k"', '"j"'),
    (
        {"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": False},
        '{"a": 1}',
        '{"b": 1}',
    ),
    ({"type": "object", "additionalProperties": {"type": "integer"}}, '{"b": 1}', '{"b": "x"}'),
    ({"type": "array", "prefixItems": [{"type": "integer"}], "items": False}, "[1]", "[1, 2]"),
    ({"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 2}, "[1, 2]", "[1, 2, 3]"),
    ({"type": "string", "minLength": 2, "maxLength": 3}, '"ab"', '"abcd"'),
    ({"type": "string", "pattern": "^[a-z]+$"}, '"abc"', '"aBc"'),
    ({"type": "string", "format": "date"}, '"2024-01-02"', '"monday"'),
    ({"type": "integer", "minimum": -3, "maximum": 10}, "10", "11"),
    ({"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10}, "9", "10"),
    ({"type": "number", "minimum": -1.5, "maximum": 2.25}, "2.25", "2.26"),
    ({"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 2}]}, '"ab"', '"abc"'),
    ({"allOf": [{"type": "integer", "minimum": 3}]}, "3", "2"),
    ({"$defs": {"p": {"type": "integer", "maximum": 3}}, "$ref": "#/$defs/p"}, "3", "4"),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}, '{"a": 1}', "{}"),
    (
        {"type": "object", "additionalProperties": {"type": "integer"}, "maxProperties": 1},
        '{"a": 1}',
        '{"a": 1, "b": 2}',
    ),
]
# A refused keyword: a document that breaks it and that the grammar still accepts.
IGNORED = [
    ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "1"),
    ({"not": {"type": "integer"}}, "1"),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "[1, 1]"),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "dependentRequired": {"a": ["b"]}}, '{"a": 1}'),
    ({"type": "string", "pattern": "^a+$", "maxLength": 2}, '"aaa"'),
    ({"type": "object", "additionalProperties": {"type": "integer"}, "required": ["a"]}, "{}"),
]


@pytest.mark.parametrize(("schema", "good", "bad"), ENFORCED)
def test_xgrammar_enforces_each_served_keyword(compiler: Any, schema: dict[str, Any], good: str, bad: str) -> None:
    assert schema_problem(schema) is None
    assert accepts(compiler, schema, good) and not accepts(compiler, schema, bad)


@pytest.mark.parametrize(("schema", "bad"), IGNORED)
def test_xgrammar_ignores_each_refused_keyword(compiler: Any, schema: dict[str, Any], bad: str) -> None:
    # Why they are refused: the grammar lets a violating document through.
    assert accepts(compiler, schema, bad) and schema_problem(schema) is not None


# --- the compile check ---------------------------------------------------------------------------


class CountingCompiler:
    def __init__(self, delay: float = 0.0) -> None:
        self.calls: list[OutputConstraint] = []
        self.delay = delay

    def start(self) -> None:
        pass

    def compile(self, constraint: OutputConstraint) -> CompileVerdict:
        import time

        time.sleep(self.delay)
        self.calls.append(constraint)
        return CompileVerdict("no" if constraint.spec == "bad" else None, self.delay)

    def close(self) -> None:
        pass


async def test_verdicts_are_cached_and_one_compile_serves_concurrent_requests() -> None:
    compiler = CountingCompiler(delay=0.2)
    check = ConstraintCheck(compiler, cached=2)
    same = [OutputConstraint("regex", "a+", f"field{i}") for i in range(5)]
    assert await asyncio.gather(*(check.verdict(c) for c in same)) == [None] * 5
    assert len(compiler.calls) == 1
    with pytest.raises(StrategyError, match="^structured_outputs.regex: does not compile: no$") as refused:
        await check.check(OutputConstraint("regex", "bad", "structured_outputs.regex"))
    assert refused.value.field == "structured_outputs.regex"
    assert await check.verdict(OutputConstraint("regex", "bad")) == "no" and len(compiler.calls) == 2
    await check.verdict(OutputConstraint("regex", "b+"))  # a third verdict: the oldest is dropped
    await check.verdict(OutputConstraint("regex", "a+"))
    assert len(compiler.calls) == 4


async def test_a_caller_going_away_leaves_the_compile_to_the_others() -> None:
    compiler = CountingCompiler(delay=0.3)
    check = ConstraintCheck(compiler)
    first = asyncio.create_task(check.verdict(OutputConstraint("regex", "c+")))
    second = asyncio.create_task(check.verdict(OutputConstraint("regex", "c+")))
    await asyncio.sleep(0.05)
    first.cancel()
    assert await second is None and len(compiler.calls) == 1


def test_the_grammar_worker_compiles_refuses_and_is_stopped_past_its_bound() -> None:
    worker = GrammarWorker(str(default_checkpoint_dir()), 49152, timeout_s=1.0, regex_timeout_s=0.5)
    try:
        assert worker.compile(OutputConstraint("json", json.dumps(PERSON))).error is None
        refused = worker.compile(OutputConstraint("regex", "(a"))
        assert refused.error is not None and "parenthesis" in refused.error and "/project" not in refused.error
        grammar = worker.compile(OutputConstraint("grammar", "root ::= foo"))
        assert grammar.error is not None and 'Rule "foo" is not defined' in grammar.error
        # Compiles, and matches nothing: the engine would have no token to sample.
        for empty in (OutputConstraint("grammar", "root ::= root"), OutputConstraint("json", '{"$ref": "#"}')):
            verdict = worker.compile(empty)
            assert verdict.error is not None and "no output can match it" in verdict.error
        first = worker._process
        # A bounded repetition that takes seconds to compile (measured ~7 s on the project's host); a
        # regex is held to its own, tighter bound (the engine core's; the e2e tests hold a schema to 10 s).
        slow = worker.compile(OutputConstraint("regex", ".{0,160}"))
        assert slow.error is not None and "longer than 0.5 s" in slow.error and slow.seconds < 5
        assert first is not None and first.poll() is not None  # the child was stopped
        assert worker.compile(OutputConstraint("regex", "[0-9]{3}")).error is None  # and a new one serves
    finally:
        worker.close()


# --- vLLM and NBCE -------------------------------------------------------------------------------


def test_each_constraint_maps_to_vllms_structured_outputs() -> None:
    from server.engines.base import SamplingOptions
    from server.engines.vllm_admission import to_vllm_sampling
    from server.engines.vllm_structured import engine_settings

    assert engine_settings().backend == "xgrammar"
    cases = {
        OutputConstraint("json", '{"type":"integer"}'): ("json", '{"type":"integer"}'),
        OutputConstraint("json_object"): ("json", output_constraint.JSON_OBJECT_SCHEMA),
        OutputConstraint("regex", "a+"): ("regex", "a+"),
        OutputConstraint("grammar", 'root ::= "a"'): ("grammar", 'root ::= "a"'),
    }
    for constraint, (field, value) in cases.items():
        params = to_vllm_sampling(SamplingOptions(max_new_tokens=4, constraint=constraint), None)
        assert getattr(params.structured_outputs, field) == value
    assert to_vllm_sampling(SamplingOptions(max_new_tokens=4), None).structured_outputs is None


def test_a_row_tag_carries_its_constraint_through_extra_args() -> None:
    constraint = OutputConstraint("regex", "a|b", "ignored")
    tag = RowTag("j", "j:0", 1, 3, 2, Combination(), Draw(), constraint, (2, 7))
    back = RowTag.from_extra_args(json.loads(json.dumps(tag.to_extra_args())))
    assert back == tag and back is not None and back.stop_token_ids == (2, 7)
    assert announced(announce(constraint)) == constraint and announce(None) is None
    with pytest.raises(ValueError, match="output constraint"):
        announced({"nbce_grammar": {"kind": "xml", "spec": ""}})


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_checkpoint_dir())


@pytest.fixture(scope="module")
def grammars() -> GrammarCache:
    return GrammarCache(str(default_checkpoint_dir()), 49152)


def allowed_ids(logits: torch.Tensor, row: int) -> set[int]:
    return set(torch.isfinite(logits[row]).nonzero().flatten().tolist())


def test_a_group_grammar_masks_its_rows_after_the_confirmed_tokens(grammars: GrammarCache, tokenizer: Any) -> None:
    constraint = OutputConstraint("regex", "(yes|no)!")
    eos = tokenizer.eos_token_id
    state = GroupGrammar(grammars.prepare(constraint), [eos], confirmed=tokenizer.encode("ye"))
    logits = torch.zeros(3, 49152)
    assert state.mask(logits, [0, 2], output=[])
    allowed = allowed_ids(logits, 0)
    assert allowed and all("yes!".startswith("ye" + tokenizer.decode([t])) for t in allowed)
    assert allowed_ids(logits, 1) == set(range(49152))  # a row not in the group is untouched
    logits = torch.zeros(3, 49152)
    assert state.mask(logits, [0, 1, 2], output=tokenizer.encode("s!"))
    assert allowed_ids(logits, 1) == {eos}  # the output is complete: only its end
    assert not GroupGrammar(grammars.prepare(constraint), [eos], confirmed=tokenizer.encode("maybe")).mask(
        torch.zeros(1, 49152), [0], output=[]
    )


def test_the_nbce_processor_combines_the_masked_rows(tokenizer: Any) -> None:
    from vllm.v1.sample.logits_processor import BatchUpdate

    from strategies.nbce.processor import NbceLogitsProcessor

    config = SimpleNamespace(
        model_config=SimpleNamespace(tokenizer=str(default_checkpoint_dir()), get_vocab_size=lambda: 49152)
    )
    processor = NbceLogitsProcessor(config, torch.device("cpu"), False)
    constraint = OutputConstraint("regex", "(red|green|blue)")
    eos = tokenizer.eos_token_id
    outputs: list[list[int]] = [[], [], []]

    def added(base: int, confirmed: list[int]) -> list[tuple[int, Any, list[int], list[int]]]:
        tags = [RowTag("job", f"job:{base}", k, 3, base, Combination(), Draw(), constraint, (eos,)) for k in range(3)]
        params = [SimpleNamespace(extra_args=t.to_extra_args()) for t in tags]
        return [(k, params[k], [5, 6, *confirmed], outputs[k]) for k in range(3)]

    processor.update_state(BatchUpdate(batch_size=3, removed=[], added=added(0, []), moved=[]))
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 49152, generator=generator)
    logits[:, tokenizer.encode("The")[0]] = 50.0  # what the rows would say unconstrained
    expected_logits = logits.clone()
    token = int(processor.apply(logits)[0].argmax())
    words = ("red", "green", "blue")
    assert any(w.startswith(tokenizer.decode([token])) for w in words) and all(int(r.argmax()) == token for r in logits)
    # The same choice as NBCE over the rows masked first (the design note's order).
    GroupGrammar(processor.grammars.prepare(constraint), [eos], []).mask(expected_logits, [0, 1, 2], [])
    merged, _ = combine(expected_logits, Combination())
    assert choose_token(merged, Draw(), "job", 0) == token
    # A resubmitted group (one confirmed token in its prompts) continues the grammar from there.
    processor.update_state(BatchUpdate(batch_size=3, removed=[0, 1, 2], added=added(1, [token]), moved=[]))
    logits = torch.randn(3, 49152, generator=generator)
    second = int(processor.apply(logits)[0].argmax())
    text = tokenizer.decode([token, second])
    assert any(w.startswith(text) for w in words) or (
        second == eos and text.removesuffix(tokenizer.eos_token) in words
    ), text
