"""Hostile request bodies: the shapes of the hardening probes, at any size, for every route.

Each shape is a raw body (bytes), built without building its Python value first (a 30 MB list of
a million dicts is assembled from bytes in milliseconds). A shape puts its hostile field into a
route's smallest valid body, so that the field is what the server must refuse; the probe's first
findings came from exactly such bodies (a million chat messages, sixteen million token ids,
nesting 962 deep). `json_values` draws nested JSON for hypothesis.

    >>> body = shape_body("/generate", "documents", 64)
    >>> body.startswith(b'{"inputs": "Hi", "parameters": {"max_new_tokens": 1}, "context": ["a","a"')
    True
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

# Every route that takes a body, with its smallest valid body (one new token at most).
BODIES: dict[str, dict[str, Any]] = {
    "/generate": {"inputs": "Hi", "parameters": {"max_new_tokens": 1}},
    "/generate_stream": {"inputs": "Hi", "parameters": {"max_new_tokens": 1}},
    "/": {"inputs": "Hi", "parameters": {"max_new_tokens": 1}},
    "/v1/completions": {"prompt": "Hi", "max_tokens": 1, "temperature": 0},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "temperature": 0},
    "/tokenize": {"prompt": "Hi"},
    "/detokenize": {"tokens": [72, 105]},
}
# The field each route reads its prompt from (a shape of text or ids replaces it there).
PROMPT_FIELD = {
    "/generate": "inputs",
    "/generate_stream": "inputs",
    "/": "inputs",
    "/v1/completions": "prompt",
    "/v1/chat/completions": "messages",
    "/tokenize": "prompt",
    "/detokenize": "tokens",
}


def repeated(item: bytes, size: int, opening: bytes = b"[", closing: bytes = b"]") -> bytes:
    """A JSON array (or object, with its brackets) of `item` repeated to about `size` bytes."""
    count = max(1, size // (len(item) + 1))
    return opening + b",".join([item] * count) + closing


def with_field(route: str, field: str, raw: bytes) -> bytes:
    """The route's body with `field` set to the raw JSON `raw` (added last, or replacing it)."""
    base = json.dumps({k: v for k, v in BODIES[route].items() if k != field}).encode()[:-1]
    return base + (b", " if base != b"{" else b"") + json.dumps(field).encode() + b": " + raw + b"}"


def _keys(size: int) -> bytes:
    count = max(1, size // 12)
    return b"{" + b",".join(b'"k%d":1' % i for i in range(count)) + b"}"


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def _builders(route: str, size: int) -> dict[str, Callable[[], bytes]]:
    """Each shape's body, built only when called (a 30 MB body takes its memory then)."""
    prompt = PROMPT_FIELD[route]
    return {
        "messages": lambda: with_field(route, "messages", repeated(b'{"role":"user","content":"a"}', size)),
        "content parts": lambda: with_field(
            route,
            "messages",
            b'[{"role":"user","content":' + repeated(b'{"type":"text","text":""}', size) + b"}]",
        ),
        "token ids": lambda: with_field(route, "tokens" if route == "/detokenize" else "prompt", repeated(b"1", size)),
        "nested token ids": lambda: with_field(route, "prompt", b"[" + repeated(b"1", size) + b"]"),
        "documents": lambda: with_field(route, "context", repeated(b'"a"', size)),
        "empty documents": lambda: with_field(route, "context", repeated(b'""', size)),
        "stop strings": lambda: with_field(route, "stop", repeated(b'"s"', size)),
        "tgi stop strings": lambda: with_field(route, "parameters", b'{"stop":' + repeated(b'"s"', size) + b"}"),
        "logit_bias map": lambda: with_field(route, "logit_bias", _keys(size)),
        "tools": lambda: with_field(route, "tools", repeated(b"{}", size)),
        "empty lists": lambda: with_field(route, "context", repeated(b"[]", size)),
        "empty objects": lambda: with_field(route, "strategy", b'{"name":"yarn","x":' + repeated(b"{}", size) + b"}"),
        "top-level keys": lambda: json.dumps(BODIES[route]).encode()[:-1] + b"," + _keys(size)[1:],
        "strategy keys": lambda: with_field(route, "strategy", b'{"name":"yarn",' + _keys(size)[1:]),
        "long text": lambda: with_field(route, prompt, b'"' + b"a" * size + b'"'),
        "escapes": lambda: with_field(route, prompt, b'"' + b'\\"[{,' * (size // 5) + b'"'),
        "numbers": lambda: with_field(route, "priority", b"9" * min(size, 5000)),
    }


def _shapes(route: str, size: int) -> dict[str, bytes]:
    return {name: build() for name, build in _builders(route, size).items()}


# Depths around where the probe found a RecursionError (962-968 deep), and far past it.
NESTING_DEPTHS = (65, 962, 965, 968, 5000)


def nested_bodies(route: str) -> dict[str, bytes]:
    """The route's body with a field nested deep (inside `strategy`, and the body itself)."""
    out = {f"strategy nested {d}": with_field(route, "strategy", _nested(d)) for d in NESTING_DEPTHS}
    out |= {f"body nested {d}": _nested(d) for d in NESTING_DEPTHS}
    return out


# Bytes no JSON parser takes, and text the contract refuses.
MALFORMED: dict[str, bytes] = {
    "truncated": b'{"inputs": "x",',
    "not json": b"not json at all",
    "invalid utf-8": b'{"inputs": "\xff\xfe"}',
    "utf-16": '{"inputs": "x"}'.encode("utf-16"),
    "utf-8 bom": b'\xef\xbb\xbf{"inputs": "x"}',
    "surrogate": b'{"inputs": "\\ud800", "prompt": "\\udfff"}',
    "nan": b'{"inputs": "x", "prompt": "x", "temperature": NaN, "deadline_s": Infinity}',
    "huge float": b'{"inputs": "x", "prompt": "x", "temperature": 1e308, "deadline_s": 1e308}',
    "empty": b"",
    "null": b"null",
    "array": b"[1, 2, 3]",
}


def shape_body(route: str, shape: str, size: int) -> bytes:
    return _builders(route, size)[shape]()


def shapes(route: str, size: int) -> dict[str, bytes]:
    """Every hostile body of the route at about `size` bytes each, nested and malformed ones too."""
    return {**_shapes(route, size), **nested_bodies(route), **MALFORMED}


SHAPES = tuple(_builders("/generate", 16))


def json_values(max_leaves: int = 30) -> Any:
    """A hypothesis strategy for nested JSON: every kind of value, with keys the routes read, so
    that a drawn object is often a body field of the wrong shape rather than one refused as unknown."""
    from hypothesis import strategies as st

    names = sorted({k for body in BODIES.values() for k in body} | {"context", "strategy", "stop", "name", "role"})
    keys = st.sampled_from(names) | st.text(max_size=8)
    leaves = (
        st.none()
        | st.booleans()
        | st.integers(min_value=-(2**70), max_value=2**70)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=20)
    )

    def containers(children: Callable[..., Any]) -> Any:
        return st.lists(children, max_size=6) | st.dictionaries(keys, children, max_size=6)

    return st.recursive(leaves, containers, max_leaves=max_leaves)
