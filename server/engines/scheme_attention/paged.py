"""One row's keys and values, read back from vLLM's paged CPU KV cache.

vLLM 0.32's CPU backend keeps the cache as [blocks, kv_heads, 2 x block_size, head_dim] and splits
it into keys and values along the third axis (`split_kv_cache`, server/engines/vllm_adapter/). How a
(block, head)'s block_size x head_dim keys and values lie in its memory depends on the kernel ISA:
`vec` and `vec16` store keys transposed and values plain, `amx` (bfloat16 on CPUs with AMX) packs
pairs of dimensions and of tokens for its tile instructions. The layout is not part of any API, so
`probe_layout` writes known values with vLLM's own cache-write op (`reshape_and_cache`), reads where
each (token, dimension) landed, and checks the map on random keys: a layout that is not a clean
permutation of a block is refused, never guessed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

# bfloat16 holds every integer up to 256 exactly: the probe's labels must stay below it.
MAX_EXACT_LABEL = 256


@dataclass(frozen=True)
class BlockLayout:
    """Where a block's (token t, dimension d) lies in its (block, head) memory, flattened:
    keys[t, d] = block_memory[key_index[t * head_dim + d]] (values likewise)."""

    key_index: torch.Tensor  # [block_size * head_dim], int64
    value_index: torch.Tensor


@functools.cache
def probe_layout(isa: str, dtype: torch.dtype, head_dim: int, block_size: int) -> BlockLayout | None:
    """How vLLM's cache-write op with `isa` lays out a block's keys and values (None: not a
    permutation this reader can undo, or an ISA this build cannot run)."""
    if max(block_size, head_dim) > MAX_EXACT_LABEL:
        return None
    try:
        by_token = _written_block(isa, dtype, head_dim, block_size, torch.arange(block_size).view(-1, 1, 1))
        by_dim = _written_block(isa, dtype, head_dim, block_size, torch.arange(head_dim).view(1, 1, -1))
    except Exception:  # noqa: BLE001 - an ISA this build cannot run: no layout
        return None
    layout = BlockLayout(*(_index(by_token[i], by_dim[i], head_dim) for i in range(2)))
    if layout.key_index is None or layout.value_index is None:
        return None
    return layout if _reads_back(isa, dtype, head_dim, block_size, layout) else None


def _written_block(
    isa: str, dtype: torch.dtype, head_dim: int, block_size: int, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The flat memory of block 0, head 0 (keys, values) after writing a block of tokens whose
    every element is its label (a token's position or a dimension's index)."""
    from server.engines.vllm_adapter.cpu_attention import reshape_and_cache, split_kv_cache

    kv = labels.expand(block_size, 1, head_dim).to(dtype).contiguous()
    cache = torch.full((1, 1, block_size, 2 * head_dim), -1.0, dtype=dtype)
    key_cache, value_cache = split_kv_cache(cache)
    reshape_and_cache(kv, kv, key_cache, value_cache, torch.arange(block_size), isa)
    return key_cache[0, 0].flatten().long(), value_cache[0, 0].flatten().long()


def _index(tokens: torch.Tensor, dims: torch.Tensor, head_dim: int) -> torch.Tensor | None:
    """index[t * head_dim + d] = the flat offset holding (t, d); None unless every (t, d) is held once."""
    element = tokens * head_dim + dims
    if (tokens < 0).any() or (dims < 0).any() or not torch.equal(element.sort().values, torch.arange(len(element))):
        return None
    index = torch.empty_like(element)
    index[element] = torch.arange(len(element))
    return index


def _reads_back(isa: str, dtype: torch.dtype, head_dim: int, block_size: int, layout: BlockLayout) -> bool:
    """Random keys and values of a row across two blocks, in two heads, read back exactly."""
    from server.engines.vllm_adapter.cpu_attention import reshape_and_cache, split_kv_cache

    kv_heads, blocks, tokens = 2, 2, block_size + 3
    key = torch.randn(tokens, kv_heads, head_dim).to(dtype)
    value = torch.randn(tokens, kv_heads, head_dim).to(dtype)
    cache = torch.zeros(blocks, kv_heads, block_size, 2 * head_dim, dtype=dtype)
    key_cache, value_cache = split_kv_cache(cache)
    reshape_and_cache(key, value, key_cache, value_cache, torch.arange(tokens), isa)
    row_k, row_v = read_row(key_cache, value_cache, torch.arange(blocks), tokens, layout)
    return bool(torch.equal(row_k, key.transpose(0, 1)) and torch.equal(row_v, value.transpose(0, 1)))


def read_row(
    key_cache: torch.Tensor, value_cache: torch.Tensor, block_ids: torch.Tensor, n: int, layout: BlockLayout
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [kv_heads, n, head_dim] of the row whose blocks are `block_ids`."""
    return read_range(key_cache, value_cache, block_ids, 0, n, layout)


def read_range(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_ids: torch.Tensor,
    start: int,
    stop: int,
    layout: BlockLayout,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [kv_heads, stop - start, head_dim] at positions start..stop-1 of the row."""
    block_size = key_cache.shape[2]
    first_block = start // block_size
    blocks = block_ids[first_block : -(-stop // block_size)].to(torch.long)
    offset = first_block * block_size
    return (
        _unpacked(key_cache, blocks, layout.key_index)[:, start - offset : stop - offset],
        _unpacked(value_cache, blocks, layout.value_index)[:, start - offset : stop - offset],
    )


def _unpacked(cache: torch.Tensor, blocks: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[kv_heads, len(blocks) x block_size, head_dim] of `blocks`, their memory put in (t, d) order."""
    m = len(blocks)
    _, kv_heads, block_size, head_dim = cache.shape
    flat = cache.index_select(0, blocks).view(m, kv_heads, block_size * head_dim)
    ordered = flat.index_select(2, index).view(m, kv_heads, block_size, head_dim)
    return ordered.permute(1, 0, 2, 3).reshape(kv_heads, m * block_size, head_dim)
