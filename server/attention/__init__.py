"""Attention schemes: how a row's attention sees positions, one small file each (plain torch).

| kind           | file              | scheme                                                     |
|----------------|-------------------|------------------------------------------------------------|
| `rerope`       | rerope.py         | ReRoPE: relative positions clamped at the window            |
| `leaky_rerope` | leaky_rerope.py   | Leaky ReRoPE: slope 1/k beyond the window                   |
| `self_extend`  | self_extend.py    | Self-Extend: grouped positions beyond the neighbour window  |
| `string`       | string.py         | STRING: far positions shifted onto well-trained ones        |
| `dca`          | dual_chunk.py     | Dual Chunk Attention (with ChunkLlama's mscale)             |
| `logn`         | logn.py           | log-n query scaling alone (vLLM's kernel runs the row)      |

The interface is `server.plan.AttentionScheme`; banded.py holds the attention of the schemes that
score by distance bands, fused.py and rotary.py the plain-torch pieces they share. A new scheme is
one file and one line in `SCHEMES` below: the engine reads a row's scheme with `scheme_from_spec`
and calls the interface, never a kind.

    >>> scheme_from_spec({"kind": "rerope", "window": 8, "logn_window": None})
    Rerope(window=8, logn_window=None)
"""

from __future__ import annotations

from typing import Any

from server.attention.dual_chunk import DualChunk
from server.attention.leaky_rerope import LeakyRerope
from server.attention.logn import LogN
from server.attention.rerope import Rerope
from server.attention.self_extend import SelfExtend
from server.attention.string import String
from server.plan import AttentionScheme

SCHEMES: dict[str, type[AttentionScheme]] = {
    scheme.kind: scheme for scheme in (Rerope, LeakyRerope, SelfExtend, String, DualChunk, LogN)
}


def scheme_from_spec(spec: dict[str, Any]) -> AttentionScheme:
    """The scheme `AttentionScheme.spec()` describes."""
    fields = dict(spec)
    return SCHEMES[fields.pop("kind")](**fields)
