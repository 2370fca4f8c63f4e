"""A request's JSON body, measured before it is parsed: how many values it holds, and how deep.

`json.loads` holds the interpreter for as long as it runs, in a worker thread too: a 30 MB body of
ten million empty lists takes it 2.3 s on this project's CPU host, a million object keys 1.8 s,
and meanwhile no other request (not even `/health`) is answered. Nesting a thousand deep makes
the parser or the validators after it raise RecursionError. So the raw bytes are measured first,
with C-speed byte operations only, and a body over either bound is refused (422, naming it)
before anything builds a Python object from it:

- items: every value and object key counts one (1 + the commas and colons outside strings + the
  non-empty arrays and objects); the body's strings are set aside first, so a document full of
  commas or brackets counts as the one string it is;
- depth: the deepest nesting of arrays and objects.

A body within the bounds parses in a bounded time (at most 262,144 items: under 0.2 s at the
slowest shape, keys of one object), and every list in it is then bounded again, in count, by the
field that holds it (server/schemas.py).

    >>> measure_json(b'{"inputs": "a, [b], {c}", "context": ["d", "e"]}')
    JsonShape(items=7, depth=2)
    >>> measure_json(b'[[[["\\\\"]]]]')
    JsonShape(items=5, depth=4)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

from starlette.exceptions import HTTPException

from server.settings import MAX_JSON_ITEMS

# Nesting of arrays and objects: the deepest body of the contract (a strategy inside `auto`'s
# scoring list, chat content parts) is 5 deep; JSON schemas of structured output go deeper.
MAX_JSON_DEPTH = 64


def _all_but(kept: bytes) -> bytes:
    """A `bytes.translate` deletion table that keeps only `kept`."""
    return bytes(sorted(set(range(256)) - set(kept)))


_ROUGH = _all_but(b",:[{")
_BRACKETS = _all_but(b"[]{}")
# Structure kept, whitespace dropped, anything else (a number, a literal, string text) an "x".
_VALUE_CHARS = bytes(b if b in b',:[{]}"' else ord("x") for b in range(256))
_WHITESPACE = b" \t\n\r"
_NESTING = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}


@dataclass(frozen=True)
class JsonShape:
    items: int
    depth: int


class BodyShapeError(HTTPException):
    """A body over a bound of its shape, or not UTF-8 (422 naming `body` and the bound)."""

    def __init__(self, message: str) -> None:
        super().__init__(422, f"body: {message}")


def _rough(body: bytes) -> JsonShape:
    """Upper bounds, read as if the body held no strings: enough to pass most bodies at once."""
    separators = body.translate(None, _ROUGH)
    return JsonShape(len(separators) + 1, separators.count(b"[") + separators.count(b"{"))


def measure_json(body: bytes, max_items: int = MAX_JSON_ITEMS) -> JsonShape:
    """The body's items and depth, counted outside its strings (exact for valid JSON; a parser
    stops at an invalid body's first error, before anything this count misses). Past `max_items`
    it stops counting: `items` is then only known to be larger, and `depth` is 0."""
    if b"\\" in body:
        # Inside strings every backslash escapes the next byte: drop escaped backslashes, then
        # escaped quotes (left to right, as a parser reads them); every quote left opens or closes a string.
        body = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    structure = body.translate(_VALUE_CHARS, _WHITESPACE)
    if structure.count(b'"') // 2 > max_items:  # each string is an item
        return JsonShape(max_items + 1, 0)
    outside = b"x".join(structure.split(b'"')[0::2])  # each string an "x"
    brackets = outside.translate(None, _BRACKETS)
    # Each comma and colon adds a value, and so does each container with anything in it.
    opening = outside.count(b"[") + outside.count(b"{")
    empty = outside.count(b"[]") + outside.count(b"{}")
    items = 1 + outside.count(b",") + outside.count(b":") + opening - empty
    if items > max_items:
        return JsonShape(items, 0)
    return JsonShape(items, max(accumulate(_NESTING[b] for b in brackets), default=0))


def check_json_shape(body: bytes, max_items: int = MAX_JSON_ITEMS) -> None:
    """BodyShapeError when the body holds more than `max_items` values or nests deeper than
    MAX_JSON_DEPTH; a body whose rough count passes is never measured further."""
    shape = _rough(body)
    if shape.items <= max_items and shape.depth <= MAX_JSON_DEPTH:
        return
    if shape.items <= max_items or b'"' in body:  # strings may hold some of what was counted
        shape = measure_json(body, max_items)
    if shape.items > max_items:
        raise BodyShapeError(f"the JSON body holds more than {max_items} values, this server's limit")
    if shape.depth > MAX_JSON_DEPTH:
        raise BodyShapeError(f"the JSON body nests {shape.depth} deep; the limit is {MAX_JSON_DEPTH}")


def parse_json_body(body: bytes, max_items: int = MAX_JSON_ITEMS) -> Any:
    """The parsed body, or BodyShapeError before parsing when it is over a bound or not UTF-8;
    malformed JSON raises json.JSONDecodeError (FastAPI answers it as invalid JSON)."""
    check_json_shape(body, max_items)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BodyShapeError(f"the JSON body is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except ValueError as exc:  # an integer past Python's digit limit (4,300), which JSON allows
        raise BodyShapeError(f"a number the parser refuses ({exc})") from None
    except RecursionError:  # the depth bound keeps the parser far from it; a safety net all the same
        raise BodyShapeError(f"the JSON body nests too deep; the limit is {MAX_JSON_DEPTH}") from None
