"""How a row's output constraint (structured output; the type is server/plan.py's
`OutputConstraint`: a JSON schema, any JSON object, a regular expression or a grammar) is compiled.
Part of the engine API (server/engines/base.py).

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

from typing import Any

from server.plan import CONSTRAINT_KINDS, ConstraintKind, OutputConstraint

__all__ = [
    "ANY_WHITESPACE",
    "CONSTRAINT_KINDS",
    "JSON_OBJECT_SCHEMA",
    "ConstraintKind",
    "OutputConstraint",
    "compile_constraint",
    "is_lark",
]

# `json_object`: any JSON object, as vLLM compiles it.
JSON_OBJECT_SCHEMA = '{"type": "object"}'
# Whitespace between JSON tokens is the model's choice (vLLM's default, `disable_any_whitespace`
# off): an output pretty-printed or compact validates either way.
ANY_WHITESPACE = True


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
    match constraint.kind:
        case "json":
            return compiler.compile_json_schema(constraint.spec, any_whitespace=ANY_WHITESPACE, separators=separators)
        case "json_object":
            return compiler.compile_json_schema(
                JSON_OBJECT_SCHEMA, any_whitespace=ANY_WHITESPACE, separators=separators
            )
        case "regex":
            return compiler.compile_regex(constraint.spec)
        case "grammar" if is_lark(constraint.spec):
            return compiler.compile_lark(constraint.spec)
        case "grammar":
            return compiler.compile_grammar(constraint.spec)
