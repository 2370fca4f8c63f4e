"""Which JSON schemas ropeserve constrains output to: valid ones (their own meta-schema), within its
bounds, using only keywords the grammar compiler enforces.

xgrammar (the engine's backend) turns a schema into a grammar; keywords it does not enforce would be
dropped silently, and output that matches the grammar would then fail the schema. Those keywords
are refused by name, with where they are (each was checked against xgrammar 0.2.8: a matching and
a violating document; tests/unit/test_structured_output.py). Keywords that constrain nothing
(`title`, `description`, `default`, `examples`, any unknown annotation) are allowed.

    >>> schema_problem({"type": "object", "properties": {"n": {"type": "integer", "multipleOf": 3}}})
    "properties.n: keyword 'multipleOf' is not supported (the grammar cannot enforce it)"
    >>> schema_problem({"type": "object", "properties": {"n": {"type": "integer", "maximum": 9}}}) is None
    True
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from jsonschema import exceptions, validators

# Objects and arrays nested in a schema, at most (vLLM allows 64; no extraction schema needs 32).
MAX_SCHEMA_DEPTH = 32

# Validation keywords the grammar does not enforce, and why a client should not want them here.
UNSUPPORTED_KEYWORDS: dict[str, str] = {
    "not": "the grammar cannot enforce it",
    "if": "conditional schemas are not enforced",
    "then": "conditional schemas are not enforced",
    "else": "conditional schemas are not enforced",
    "oneOf": "'exactly one' is not enforced; use anyOf",
    "dependentRequired": "the grammar cannot enforce it",
    "dependentSchemas": "the grammar cannot enforce it",
    "dependencies": "the grammar cannot enforce it",
    "contains": "the grammar cannot enforce it",
    "minContains": "the grammar cannot enforce it",
    "maxContains": "the grammar cannot enforce it",
    "multipleOf": "the grammar cannot enforce it",
    "patternProperties": "the grammar cannot enforce it",
    "unevaluatedItems": "the grammar cannot enforce it",
    "additionalItems": "use prefixItems and items",
    "$dynamicRef": "only local $ref is supported",
    "$dynamicAnchor": "only local $ref is supported",
    "$recursiveRef": "only local $ref is supported",
    "$recursiveAnchor": "only local $ref is supported",
}
# String formats xgrammar enforces (its json_schema_converter; vLLM's list).
SUPPORTED_FORMATS = frozenset(
    {
        "email",
        "date",
        "time",
        "date-time",
        "duration",
        "ipv4",
        "ipv6",
        "hostname",
        "uuid",
        "uri",
        "uri-reference",
        "uri-template",
        "json-pointer",
        "relative-json-pointer",
    }
)
# Keywords whose value is one schema, and those whose value holds schemas by name or by position.
ONE_SCHEMA = (
    "items",
    "additionalProperties",
    "propertyNames",
    "not",
    "if",
    "then",
    "else",
    "contains",
    "unevaluatedProperties",
    "unevaluatedItems",
    "additionalItems",
)
SCHEMAS_BY_NAME = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
SCHEMAS_IN_LIST = ("prefixItems", "anyOf", "allOf", "oneOf")


def schema_problem(schema: Any) -> str | None:
    """What is wrong with `schema` as an output constraint ("where: what"), or None."""
    return shape_problem(schema) or _meta_problem(schema) or next(_keyword_problems(schema, ""), None)


def shape_problem(schema: Any) -> str | None:
    """Whether `schema` is an object nested within the bound (checked before anything walks it)."""
    if not isinstance(schema, dict):
        return "must be a JSON object (a JSON schema)"
    if _depth(schema) > MAX_SCHEMA_DEPTH:
        return f"nests objects and arrays more than {MAX_SCHEMA_DEPTH} levels deep (the limit)"
    return None


def _depth(value: Any) -> int:
    """Levels of nested objects and arrays, without recursion (a body may nest deeply)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            if depth <= MAX_SCHEMA_DEPTH:  # deeper is refused anyway: stop counting
                stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def _meta_problem(schema: dict[str, Any]) -> str | None:
    """The schema against its own meta-schema (its `$schema`, else draft 2020-12; not draft 3,
    whose `required` sits on each property)."""
    if not isinstance(schema.get("$schema", ""), str):
        return "$schema: must be a string (the URI of a meta-schema)"
    validator = validators.validator_for(schema, default=validators.Draft202012Validator)
    if validator is validators.Draft3Validator:
        return "$schema: draft 3 schemas are not supported (use draft 4 or later)"
    error = exceptions.best_match(validator(validator.META_SCHEMA).iter_errors(schema))
    if error is None:
        return None
    return located(".".join(str(p) for p in error.absolute_path), error.message[:200])


def located(where: str, what: str) -> str:
    """A problem and where in the schema it is (nothing said at the schema's root)."""
    return f"{where}: {what}" if where else what


def _subschemas(schema: dict[str, Any], path: str) -> Iterator[tuple[Any, str]]:
    def at(key: str) -> str:
        return f"{path}.{key}" if path else key

    for key in ONE_SCHEMA:
        if key in schema:
            yield schema[key], at(key)
    for key in SCHEMAS_BY_NAME:
        for name, sub in (schema.get(key) or {}).items():
            yield sub, at(f"{key}.{name}")
    for key in SCHEMAS_IN_LIST:
        for i, sub in enumerate(schema.get(key) or []):
            yield sub, at(f"{key}.{i}")


def _keyword_problems(schema: Any, path: str) -> Iterator[str]:
    """Every unsupported use of a keyword in `schema` and its subschemas ("where: what")."""
    stack = [(schema, path)]
    while stack:
        node, where = stack.pop()
        if not isinstance(node, dict):
            continue  # a boolean schema
        if (problem := _node_problem(node)) is not None:
            yield located(where, problem)
        stack.extend(_subschemas(node, where))


def _node_problem(node: dict[str, Any]) -> str | None:
    for keyword, why in UNSUPPORTED_KEYWORDS.items():
        if keyword in node:
            return f"keyword {keyword!r} is not supported ({why})"
    if isinstance(node.get("items"), list):
        return "items as a list is not supported (use prefixItems)"
    if any(isinstance(node.get(k), bool) for k in ("exclusiveMinimum", "exclusiveMaximum")):
        return "a boolean exclusiveMinimum/exclusiveMaximum is not supported (give the bound as a number)"
    if node.get("uniqueItems") is True:
        return "keyword 'uniqueItems' is not supported (the grammar cannot enforce it)"
    if len(node.get("allOf") or []) > 1:
        return "allOf with more than one schema is not supported (merge them into one)"
    ref = node.get("$ref")
    if isinstance(ref, str) and not ref.startswith("#"):
        return f"$ref {ref[:100]!r}: only local references ('#/...') are supported"
    fmt = node.get("format")
    if isinstance(fmt, str) and fmt not in SUPPORTED_FORMATS:
        return f"format {fmt[:50]!r} is not supported (supported: {', '.join(sorted(SUPPORTED_FORMATS))})"
    if ("pattern" in node or "format" in node) and ("minLength" in node or "maxLength" in node):
        return "pattern or format together with minLength/maxLength is not supported (put the length in the pattern)"
    if "propertyNames" in node and "properties" in node:
        return "propertyNames together with properties is not supported"
    declared = node.get("properties") or {}
    missing = [name for name in node.get("required") or [] if name not in declared]
    if missing:
        return f"required names {missing[:5]} that properties does not declare (declare each one)"
    return None
