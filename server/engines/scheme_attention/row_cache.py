"""Contiguous copies of window rows' keys and values, grown as the rows grow.

The paged cache is the truth, but reading a row back from it is a copy of all its blocks (the
kernel needs [kv_heads, n, head_dim]): at 12k tokens that copy dominated a decode step (0.39 s per
token against vLLM's 0.07 s). So each window row keeps, per layer, a buffer that only the new
positions are appended to (read from the paged cache, once); a decode step reads one token.

Rows are dropped when vLLM finishes or preempts them (the runner tells `drop`). A row recomputed
after preemption starts again from position 0; a step whose first position is below what the
buffer holds truncates it there.

A scheme may also keep far keys (`AttentionScheme.far_keys`: rerope's unrotated, self_extend's at
floor(j/G), leaky_rerope's at j/k): b(j) depends on j alone, so each key is rotated once, when
appended, instead of all of them in every layer of every decode step (that was 96 ms a layer at
32k: 3 s a token). DCA and STRING keep none: the paged cache holds their keys where they are read.
Memory: at most a second copy of the rows' KV (46 KB per token for SmolLM2 in float32), and half
as much again for far keys (one more set of keys), released with the row.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from server.engines.scheme_attention.paged import BlockLayout, read_range
from server.plan import RowKV

FarKeys = Callable[[torch.Tensor, int], torch.Tensor | None]
"""(keys [kv_heads, m, d] at positions first.., first) -> those keys at their far positions, or
None when the row's scheme keeps no far keys (the same answer for every call of one row)."""


@dataclass
class _Buffer:
    keys: torch.Tensor  # [kv_heads, capacity, head_dim]
    values: torch.Tensor
    far_keys: torch.Tensor | None
    length: int = 0


class RowKVCache:
    def __init__(self) -> None:
        self._rows: dict[str, dict[int, _Buffer]] = {}

    def read(
        self,
        request_id: str,
        layer: int,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        block_ids: torch.Tensor,
        first: int,
        n: int,
        layout: BlockLayout,
        far: FarKeys | None = None,
    ) -> RowKV:
        """Keys and values [kv_heads, n, head_dim] of a row whose step starts at position `first`,
        and its far keys (`far` places the newly appended ones; None, or None from it: the keys
        are the far keys)."""
        buffer = self._rows.setdefault(request_id, {}).get(layer)
        held = 0 if buffer is None else min(buffer.length, first)
        keys, values = read_range(key_cache, value_cache, block_ids, held, n, layout)
        far_keys_new = None if far is None else far(keys, held)
        if buffer is None or buffer.keys.shape[1] < n:
            buffer = self._grown(buffer, held, n, keys, far_keys_new is not None)
            self._rows[request_id][layer] = buffer
        buffer.keys[:, held:n] = keys
        buffer.values[:, held:n] = values
        if far_keys_new is not None:
            assert buffer.far_keys is not None  # a row's scheme is fixed: its first step allocated them
            buffer.far_keys[:, held:n] = far_keys_new
        buffer.length = n
        row_keys = buffer.keys[:, :n]
        far_keys = row_keys if buffer.far_keys is None else buffer.far_keys[:, :n]
        return RowKV(row_keys, buffer.values[:, :n], far_keys)

    @staticmethod
    def _grown(buffer: _Buffer | None, held: int, n: int, like: torch.Tensor, with_far: bool) -> _Buffer:
        capacity = max(n, 2 * (buffer.keys.shape[1] if buffer is not None else 0), 256)
        shape = (like.shape[0], capacity, like.shape[2])
        grown = _Buffer(like.new_empty(shape), like.new_empty(shape), like.new_empty(shape) if with_far else None, held)
        if buffer is not None and held:
            grown.keys[:, :held] = buffer.keys[:, :held]
            grown.values[:, :held] = buffer.values[:, :held]
            if grown.far_keys is not None and buffer.far_keys is not None:
                grown.far_keys[:, :held] = buffer.far_keys[:, :held]
        return grown

    def drop(self, request_ids: Iterable[str]) -> None:
        dropped = [self._rows.pop(request_id, None) for request_id in request_ids]
        if any(buffers is not None for buffers in dropped):
            del dropped
            return_freed_memory()

    def rows(self) -> int:
        return len(self._rows)


def return_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing).
    A row's copies are freed as many buffers of many sizes; glibc keeps such memory for reuse, and
    a long-document server's resident memory climbed by tens of MB a request without this."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


ROW_CACHE = RowKVCache()
