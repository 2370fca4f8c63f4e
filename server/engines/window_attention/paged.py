"""One row's keys and values, read back from vLLM's paged CPU KV cache.

vLLM 0.32's CPU backend keeps the cache as [blocks, kv_heads, 2 x block_size, head_dim] and splits
it into keys and values along the third axis (`split_kv_cache`, server/engines/vllm_adapter/). How a
(block, head)'s keys lie in memory depends on the kernel ISA: `vec` and `vec16` store them
transposed ([head_dim, block_size]), values plain. The layout is not part of any API, so
`probe_layout` writes known keys with vLLM's own cache-write op (`reshape_and_cache`) and looks: a
layout it does not recognise is refused, never guessed.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch

KeyLayout = Literal["transposed", "plain"]


@functools.cache
def probe_layout(isa: str, dtype: torch.dtype, head_dim: int, block_size: int) -> KeyLayout | None:
    """How vLLM's cache-write op with `isa` lays out a block's keys (None: neither way known)."""
    from server.engines.vllm_adapter.cpu_attention import reshape_and_cache, split_kv_cache

    kv_heads, blocks = 2, 2
    tokens = block_size + 3
    key = torch.randn(tokens, kv_heads, head_dim).to(dtype)
    value = torch.randn(tokens, kv_heads, head_dim).to(dtype)
    cache = torch.zeros(blocks, kv_heads, block_size, 2 * head_dim, dtype=dtype)
    key_cache, value_cache = split_kv_cache(cache)
    try:
        reshape_and_cache(key, value, key_cache, value_cache, torch.arange(tokens), isa)
    except Exception:  # noqa: BLE001 - an ISA this build cannot run: no layout
        return None
    row_k, row_v = read_row(key_cache, value_cache, torch.arange(blocks), tokens, "transposed")
    if torch.equal(row_k, key.transpose(0, 1)) and torch.equal(row_v, value.transpose(0, 1)):
        return "transposed"
    row_k, row_v = read_row(key_cache, value_cache, torch.arange(blocks), tokens, "plain")
    if torch.equal(row_k, key.transpose(0, 1)) and torch.equal(row_v, value.transpose(0, 1)):
        return "plain"
    return None


def read_row(
    key_cache: torch.Tensor, value_cache: torch.Tensor, block_ids: torch.Tensor, n: int, layout: KeyLayout
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [kv_heads, n, head_dim] of the row whose blocks are `block_ids`."""
    return read_range(key_cache, value_cache, block_ids, 0, n, layout)


def read_range(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_ids: torch.Tensor,
    start: int,
    stop: int,
    layout: KeyLayout,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [kv_heads, stop - start, head_dim] at positions start..stop-1 of the row."""
    block_size = key_cache.shape[2]
    first_block = start // block_size
    blocks = block_ids[first_block : -(-stop // block_size)].to(torch.long)
    keys = key_cache.index_select(0, blocks)  # [m, kv_heads, block_size, head_dim], contiguous
    values = value_cache.index_select(0, blocks)
    m, kv_heads, _, head_dim = keys.shape
    if layout == "transposed":
        keys = keys.view(m, kv_heads, head_dim, block_size).permute(1, 0, 3, 2)
    else:
        keys = keys.permute(1, 0, 2, 3)
    offset = first_block * block_size
    keys = keys.reshape(kv_heads, m * block_size, head_dim)[:, start - offset : stop - offset]
    values = values.permute(1, 0, 2, 3).reshape(kv_heads, m * block_size, head_dim)[:, start - offset : stop - offset]
    return keys, values
