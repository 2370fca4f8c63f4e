"""vLLM's CPU attention backend (vllm/v1/attention/backends/cpu_attn.py), as scheme attention uses it
(server/engines/scheme_attention/): the impl class it extends and the swap that puts it into the
model, the kernel ISA, the op that writes keys and values into the paged cache, the cache's layout,
and the metadata of a step and of a sub-batch of its rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from vllm import _custom_ops, envs
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl as CpuAttentionImpl
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

__all__ = [
    "CpuAttentionImpl",
    "attention_isa",
    "block_ids",
    "layer_isa",
    "one_row_paged_attention",
    "query_starts",
    "reshape_and_cache",
    "row_lengths",
    "rows_metadata",
    "split_kv_cache",
    "swap_attention_impls",
]


def swap_attention_impls(model: nn.Module, cls: type) -> int:
    """Make every CPU attention impl of `model` (vLLM's class itself, not a subclass) a `cls`, in
    place; returns how many. `cls` must extend `CpuAttentionImpl` and add no state.

    vLLM's attention layers build their impl (`layer.impl`) from the backend, with no setting that
    names another class, so the class of the built instances is swapped. Other backends' impls
    (GPU) are left alone.
    """
    count = 0
    for module in model.modules():
        impl = getattr(module, "impl", None)
        if type(impl) is CpuAttentionImpl:
            impl.__class__ = cls
            count += 1
    return count


def attention_isa(dtype: torch.dtype, block_size: int, head_size: int) -> str:
    """The kernel ISA vLLM's CPU backend picks for this model dtype, block size and head size
    (the private `_get_attn_isa`, as its metadata builder calls it): it decides how keys lie in the
    paged cache."""
    return str(_get_attn_isa(dtype, block_size, head_size))


def layer_isa(layer: Any) -> str:
    """The ISA vLLM's CPU metadata builder set on an attention layer (`layer.isa`)."""
    return str(layer.isa)


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    isa: str,
) -> None:
    """Write tokens' keys and values [tokens, kv_heads, head_dim] into the paged cache at
    `slot_mapping` (block x block_size + offset), with vLLM's own op (`cpu_attn_reshape_and_cache`,
    what the engine writes with)."""
    _custom_ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, isa)


def split_kv_cache(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's key and value caches, as vLLM's CPU impl reads them: the cache
    [blocks, kv_heads, block_size, 2 x head_dim] viewed as [blocks, kv_heads, 2 x block_size,
    head_dim] and split along the third axis (each [blocks, kv_heads, block_size, head_dim])."""
    num_blocks, kv_heads, block_size, _ = kv_cache.shape
    key_cache, value_cache = kv_cache.view(num_blocks, kv_heads, 2 * block_size, -1).chunk(2, dim=2)
    return key_cache, value_cache


def query_starts(attn_metadata: Any) -> list[int]:
    """Where each row's tokens start in the step's query (rows + 1 entries, the last the total)."""
    starts: list[int] = attn_metadata.query_start_loc.tolist()
    return starts


def row_lengths(attn_metadata: Any) -> list[int]:
    """Each row's length after this step (tokens computed before plus those of the step)."""
    lengths: list[int] = attn_metadata.seq_lens.tolist()
    return lengths


def block_ids(attn_metadata: Any, row: int) -> torch.Tensor:
    """The paged-cache blocks of the step's row `row`, in position order."""
    return attn_metadata.block_table[row]


def rows_metadata(impl: Any, layer: Any, dtype: torch.dtype, attn_metadata: Any, rows: list[int]) -> Any:
    """vLLM's metadata for the step's rows `rows` alone (a compacted sub-batch: their tokens one
    after another, in that order), with the kernel's scheduler metadata rebuilt for them as vLLM's
    metadata builder builds it, for `impl`'s forward (a `CpuAttentionImpl`)."""
    starts = query_starts(attn_metadata)
    lengths = torch.tensor([starts[r + 1] - starts[r] for r in rows], dtype=attn_metadata.query_start_loc.dtype)
    query_start_loc = torch.zeros(len(rows) + 1, dtype=lengths.dtype)
    torch.cumsum(lengths, 0, out=query_start_loc[1:])
    row_seq_lens = attn_metadata.seq_lens[rows]
    scheduler_metadata = _custom_ops.cpu_attn_get_scheduler_metadata(
        num_reqs=len(rows),
        num_heads=impl.num_heads,
        num_kv_heads=impl.num_kv_heads,
        head_dim=impl.head_size,
        seq_lens=row_seq_lens,
        dtype=dtype,
        query_start_loc=query_start_loc,
        causal=attn_metadata.causal,
        sliding_window_size=impl.sliding_window,
        isa=layer_isa(layer),
        enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
        kv_cache_dtype=impl.kv_cache_dtype,
    )
    return dataclasses.replace(
        attn_metadata,
        num_actual_tokens=int(lengths.sum()),
        max_query_len=int(lengths.max()),
        query_start_loc=query_start_loc,
        max_seq_len=int(row_seq_lens.max()),
        seq_lens=row_seq_lens,
        block_table=attn_metadata.block_table[rows],
        scheduler_metadata=scheduler_metadata,
    )


def one_row_paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int, scale: float
) -> Callable[[], torch.Tensor]:
    """vLLM's CPU attention kernel for one row, as a call to time (scripts/bench_window_kernel.py):
    the queries q [C, heads, d] are the last C of a row whose keys and values k, v [kv_heads, n, d]
    are written into a paged cache of `block_size`-token blocks with vLLM's own op."""
    kv_heads, n, head_dim = k.shape
    queries, heads = q.shape[0], q.shape[1]
    isa = attention_isa(q.dtype, block_size, head_dim)
    blocks = -(-n // block_size)
    cache = torch.zeros(blocks, kv_heads, 2 * block_size, head_dim, dtype=q.dtype)
    key_cache, value_cache = cache.chunk(2, dim=2)
    reshape_and_cache(k.transpose(0, 1), v.transpose(0, 1), key_cache, value_cache, torch.arange(n), isa)
    starts = torch.tensor([0, queries], dtype=torch.int32)
    lengths = torch.tensor([n], dtype=torch.int32)
    table = torch.arange(blocks, dtype=torch.int32)[None]
    metadata = _custom_ops.cpu_attn_get_scheduler_metadata(
        num_reqs=1, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, seq_lens=lengths,
        dtype=q.dtype, query_start_loc=starts, causal=True, sliding_window_size=-1, isa=isa,
        enable_kv_split=False,
    )  # fmt: skip
    out = torch.empty_like(q)

    def run() -> torch.Tensor:
        _custom_ops.cpu_attention_with_kv_cache(
            q, key_cache, value_cache, out, starts, lengths, scale, True, None, -1, table, 0.0, metadata, None
        )
        return out

    return run
