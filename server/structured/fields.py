"""The request fields that ask for structured output, as OpenAI, vLLM and TGI name them, each turned
into one `OutputConstraint`:

- OpenAI (`/v1/completions`, `/v1/chat/completions`): `response_format` `{"type": "text" |
  "json_object" | "json_schema", "json_schema": {"name", "description", "schema", "strict"}}`;
- vLLM 0.32's extra field on the same routes: `structured_outputs` with one of `json` (a schema),
  `regex`, `choice` (a list of strings) or `grammar` (EBNF or Lark), or `json_object: true`
  (vLLM's older `guided_json`, `guided_regex`, ... are gone from 0.32: refused by name);
- TGI (`parameters.grammar`): `{"type": "json", "value": schema}` (a schema object or its JSON text;
  `json_object` is TGI's alias), `{"type": "regex", "value": "..."}`, or `{"type": "json_schema",
  "value": {"name", "schema"}}`.

Everything here is checked in the request's validation (a 422 naming the field): the schema's
validity and keywords (json_schema.py), the size bounds. Whether the constraint compiles is checked
next, off the event loop (compile_check.py).

    >>> ResponseFormat(type="json_schema", json_schema={"name": "r", "schema": {"type": "object"}}).constraint()
    OutputConstraint(kind='json', spec='{"type":"object"}', source='response_format.json_schema.schema')
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, StrictBool, model_validator

from server.plan import OutputConstraint
from server.structured.json_schema import schema_problem, shape_problem

# Characters of a constraint's text at most: a schema as compact JSON, a regex, a grammar (a
# `choice` list as its grammar). Compiling is bounded in time too (server/engines/grammar_check.py).
MAX_CONSTRAINT_CHARS = 32_768
# vLLM 0.32 dropped these (it ignores them, with a warning); ropeserve refuses them by name.
REMOVED_GUIDED_FIELDS = (
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "guided_decoding_backend",
    "guided_whitespace_pattern",
)


class ConstraintField(BaseModel):
    """Base of these fields: unknown keys refused, types strict (as every request body)."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


def schema_text(schema: Any) -> str:
    """A schema as the constraint's text: compact JSON, its properties in the client's order (the
    order the output writes them in). ValueError when it is not a usable schema or too large."""
    # Shape and size first (without recursion): the checks below walk the whole schema.
    if (problem := shape_problem(schema)) is not None:
        raise ValueError(problem)
    text = bounded(json.dumps(schema, separators=(",", ":"), ensure_ascii=False), "the schema")
    try:
        problem = schema_problem(schema)
    except Exception as exc:  # noqa: BLE001 - a schema the checker cannot read is the client's 422, not a 500
        problem = f"cannot be checked ({type(exc).__name__}: {str(exc)[:200]})"
    if problem is not None:
        raise ValueError(problem)
    return text


def bounded(text: str, what: str) -> str:
    """`text`, or ValueError naming `what` when it is over MAX_CONSTRAINT_CHARS."""
    if len(text) > MAX_CONSTRAINT_CHARS:
        raise ValueError(f"{what} is {len(text)} characters; the limit is {MAX_CONSTRAINT_CHARS}")
    return text


def choice_grammar(choices: list[str]) -> str:
    """The grammar of exactly one of `choices` (EBNF, escaped as vLLM's `choice_as_grammar` does)."""

    def literal(text: str) -> str:
        escapes = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
        chars = (escapes.get(ch, f"\\u{ord(ch):04x}" if ord(ch) < 0x20 or ord(ch) == 0x7F else ch) for ch in text)
        return '"' + "".join(chars) + '"'

    return "root ::= " + " | ".join(literal(c) for c in choices)


class JsonSchemaFormat(ConstraintField):
    """OpenAI's `response_format.json_schema`. `strict` is accepted either way: the output always
    matches the schema exactly (the engine cannot do less)."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: StrictBool | None = None
    _text: str = PrivateAttr()

    @model_validator(mode="after")
    def _usable(self) -> JsonSchemaFormat:
        self._text = prefixed("schema", self.schema_)
        return self


class ResponseFormat(ConstraintField):
    """OpenAI's `response_format`."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError('json_schema: give it with (and only with) "type": "json_schema"')
        return self

    def constraint(self) -> OutputConstraint | None:
        if self.type == "json_object":
            return OutputConstraint("json_object", source="response_format")
        if self.json_schema is not None:
            return OutputConstraint("json", self.json_schema._text, "response_format.json_schema.schema")
        return None


class StructuredOutputs(ConstraintField):
    """vLLM's `structured_outputs`: exactly one constraint."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = Field(default=None, min_length=1, max_length=MAX_CONSTRAINT_CHARS)
    choice: list[str] | None = Field(default=None, min_length=1)
    grammar: str | None = Field(default=None, min_length=1, max_length=MAX_CONSTRAINT_CHARS)
    json_object: StrictBool | None = None
    _constraint: OutputConstraint = PrivateAttr()

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        given = {
            "json": self.json_,
            "regex": self.regex,
            "choice": self.choice,
            "grammar": self.grammar,
            "json_object": self.json_object,
        }
        named = [name for name, value in given.items() if value is not None]
        if len(named) != 1:
            raise ValueError(f"give exactly one of {', '.join(given)} (got {', '.join(named) or 'none'})")
        self._constraint = self._parse()
        return self

    def constraint(self) -> OutputConstraint:
        return self._constraint

    def _parse(self) -> OutputConstraint:
        source = "structured_outputs"
        if self.json_ is not None:
            return OutputConstraint("json", prefixed("json", self.json_), f"{source}.json")
        if self.regex is not None:
            if "\x00" in self.regex:
                raise ValueError("regex: a NUL character cannot be matched")
            return OutputConstraint("regex", self.regex, f"{source}.regex")
        if self.choice is not None:
            if any(not c for c in self.choice):
                raise ValueError("choice: choices must be non-empty strings")
            return OutputConstraint(
                "grammar", bounded(choice_grammar(self.choice), "choice: the grammar"), f"{source}.choice"
            )
        if self.grammar is not None:
            if not self.grammar.strip():
                raise ValueError("grammar: a grammar must define a rule")
            return OutputConstraint("grammar", self.grammar, f"{source}.grammar")
        if self.json_object is False:
            raise ValueError("json_object: only true; leave structured_outputs out for free text")
        return OutputConstraint("json_object", source=f"{source}.json_object")


def parsed_schema(schema: dict[str, Any] | str) -> Any:
    """A schema given as an object, or as its JSON text."""
    if isinstance(schema, dict):
        return schema
    bounded(schema, "the schema")
    try:
        return json.loads(schema)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc})") from None


class TgiGrammar(ConstraintField):
    """TGI's `parameters.grammar`."""

    type: Literal["json", "json_object", "regex", "json_schema"]
    value: Any
    _constraint: OutputConstraint = PrivateAttr()

    @model_validator(mode="after")
    def _value_of_its_type(self) -> TgiGrammar:
        self._constraint = self._parse()
        return self

    def constraint(self) -> OutputConstraint:
        return self._constraint

    def _parse(self) -> OutputConstraint:
        source = "parameters.grammar.value"
        if self.type == "regex":
            if not isinstance(self.value, str) or not self.value:
                raise ValueError("value: a regex grammar's value is a non-empty string")
            if "\x00" in self.value:
                raise ValueError("value: a NUL character cannot be matched")
            return OutputConstraint("regex", bounded(self.value, "value: the regex"), source)
        if self.type == "json_schema":
            value = self.value if isinstance(self.value, dict) else {}
            if not isinstance(value.get("schema"), dict) or not isinstance(value.get("name", ""), str):
                raise ValueError('value: a json_schema grammar\'s value is {"name": "...", "schema": {...}}')
            if unknown := sorted(set(value) - {"name", "schema"}):
                raise ValueError(f"value: unknown fields {unknown[:5]} (only name and schema)")
            return OutputConstraint("json", prefixed("value.schema", value["schema"]), f"{source}.schema")
        if not isinstance(self.value, dict | str):
            raise ValueError("value: a json grammar's value is a JSON schema (an object, or its JSON text)")
        return OutputConstraint("json", prefixed("value", self.value), source)


def prefixed(where: str, schema: dict[str, Any] | str) -> str:
    """`schema_text`, its refusal naming `where` (a field the validation's location does not reach)."""
    try:
        return schema_text(parsed_schema(schema))
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


class OpenAIConstraintFields(BaseModel):
    """The OpenAI routes' structured-output fields, mixed into their request bodies: OpenAI's
    `response_format` and vLLM's `structured_outputs` (one at a time)."""

    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_guided_fields(cls, data: Any) -> Any:
        if isinstance(data, dict) and (old := next((k for k in REMOVED_GUIDED_FIELDS if k in data), None)):
            raise ValueError(f"{old}: removed in vLLM 0.32; use structured_outputs or response_format")
        return data

    @model_validator(mode="after")
    def _one_constraint(self) -> OpenAIConstraintFields:
        text_only = self.response_format is None or self.response_format.type == "text"
        if self.structured_outputs is not None and not text_only:
            raise ValueError("structured_outputs: give it or a non-text response_format, not both")
        if getattr(self, "ignore_eos", False) and self.constraint() is not None:
            raise ValueError("ignore_eos: a constrained output ends where its grammar does (at EOS); leave it out")
        return self

    def constraint(self) -> OutputConstraint | None:
        """What the output must match (structured output), if anything."""
        if self.structured_outputs is not None:
            return self.structured_outputs.constraint()
        return self.response_format.constraint() if self.response_format is not None else None
