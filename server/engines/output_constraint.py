"""What a row's output must match (structured output): a JSON schema, any JSON object, a regular
expression or a grammar. Part of the engine API (server/engines/base.py).

The HTTP layer builds an `OutputConstraint` from a request's `response_format`,
`structured_outputs` or TGI `grammar` (server/structured/); engines apply it while decoding. Every
compiler of a constraint (the API process's check, vLLM's xgrammar backend for a single row, NBCE's
processor for a row group) compiles it the same way, through `compile_constraint`, so a constraint
the API process compiled is one the engine core compiles.

    >>> c = OutputConstraint("regex", r"\\d{3}")
    >>> OutputConstraint.from_dict(c.to_dict()) == c
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

ConstraintKind = Literal["json", "json_object", "regex", "grammar"]
CONSTRAINT_KINDS: tuple[str, ...] = get_args(ConstraintKind)

# `json_object`: any JSON object, as vLLM compiles it.
JSON_OBJECT_SCHEMA = '{"type": "object"}'
# Whitespace between JSON tokens is the model's choice (vLLM's default, `disable_any_whitespace`
# off): an output pretty-printed or compact validates either way.
ANY_WHITESPACE = True


@dataclass(frozen=True)
class OutputConstraint:
    """`spec`: the JSON schema as JSON text (`json`), the regular expression (`regex`), the grammar
    in EBNF or Lark (`grammar`; a list of choices arrives as one), "" for `json_object`.

    `source` names the request field it came from, for messages; it is not part of its identity."""

    kind: ConstraintKind
    spec: str = ""
    source: str = field(default="", compare=False)

    def key(self) -> tuple[str, str]:
        """What a compiled grammar is cached under."""
        return (self.kind, self.spec)

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "spec": self.spec}

    @classmethod
    def from_dict(cls, raw: Any) -> OutputConstraint:
        """The constraint `to_dict` wrote; ValueError if it is not one."""
        if not isinstance(raw, dict) or raw.get("kind") not in CONSTRAINT_KINDS or not isinstance(raw.get("spec"), str):
            raise ValueError(f"not an output constraint: {str(raw)[:100]}")
        return cls(raw["kind"], raw["spec"])


def is_lark(grammar: str) -> bool:
    """Whether a grammar is written in Lark rather than EBNF: no line defines a rule with `::=`
    (vLLM's test, so both compile a grammar the same way)."""
    for line in grammar.split("\n"):
        code = line.split("#", 1)[0].split("//", 1)[0].strip()
        if "::=" in code:
            return False
    return True


def compile_constraint(compiler: Any, constraint: OutputConstraint) -> Any:
    """The constraint compiled by an xgrammar `GrammarCompiler` (passed in, so that the engine API
    imports nothing), with the options vLLM's xgrammar backend uses (ANY_WHITESPACE)."""
    separators = None if ANY_WHITESPACE else (",", ":")
    if constraint.kind in ("json", "json_object"):
        schema = constraint.spec if constraint.kind == "json" else JSON_OBJECT_SCHEMA
        return compiler.compile_json_schema(schema, any_whitespace=ANY_WHITESPACE, separators=separators)
    if constraint.kind == "regex":
        return compiler.compile_regex(constraint.spec)
    if is_lark(constraint.spec):
        return compiler.compile_lark(constraint.spec)
    return compiler.compile_grammar(constraint.spec)
