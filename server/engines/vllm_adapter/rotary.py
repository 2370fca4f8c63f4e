"""vLLM's rotary embeddings: the class the slot table extends, vLLM's constructor without its memo,
and which rotaries are a plain table lookup (server/engines/multi_rope/table.py uses all three).
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.layers.rotary_embedding import _ROPE_DICT, RotaryEmbedding, get_rope

__all__ = ["InPlaceTableRotaryEmbedding", "RotaryEmbedding", "build_rope", "is_plain_rotary"]

# The forwards of vLLM's rotary CustomOp that read `cos_sin_cache[positions]` (native, CPU, CUDA).
TABLE_FORWARDS = ("forward_native", "forward_cpu", "forward_cuda")


def build_rope(
    head_size: int, max_position: int, is_neox_style: bool, parameters: dict[str, Any], dtype: torch.dtype
) -> Any:
    """vLLM's rotary for `parameters` (`get_rope`, built on the current device), left out of
    `get_rope`'s memo (the private `_ROPE_DICT`): one rotary per request length (dynamic_ntk) must
    not pile up there."""
    rotary = get_rope(head_size, max_position, is_neox_style, dict(parameters), dtype)
    for cache_key in [k for k, v in _ROPE_DICT.items() if v is rotary]:
        del _ROPE_DICT[cache_key]
    return rotary


def is_plain_rotary(module: Any) -> bool:
    """vLLM rotaries whose forward is `RotaryEmbedding`'s (a table lookup by position): the ones a
    table of other rows can stand in for. M-RoPE, dual-chunk, Deepseek and others have forwards of
    their own."""
    if not isinstance(module, RotaryEmbedding):
        return False
    kind = type(module)
    return all(getattr(kind, f) is getattr(RotaryEmbedding, f) for f in TABLE_FORWARDS)


class InPlaceTableRotaryEmbedding(RotaryEmbedding):
    """vLLM's `RotaryEmbedding` shaped like `template` with room for `max_positions` rows, built
    without a table (`init_cache=False`): the subclass registers its own `cos_sin_cache` buffer,
    which is then never replaced.

    vLLM's forwards call the private `_match_cos_sin_cache_dtype` first, which replaces the buffer
    with a converted copy when the query's dtype or device differs; a table written in place (the
    slot table) must stay the one buffer its rows are written into.
    """

    def __init__(self, template: RotaryEmbedding, max_positions: int) -> None:
        super().__init__(
            template.head_size,
            template.rotary_dim,
            max_positions,
            template.base,
            template.is_neox_style,
            template.dtype,
            init_cache=False,
        )

    def _match_cos_sin_cache_dtype(self, query: torch.Tensor) -> torch.Tensor:
        table: torch.Tensor = self.cos_sin_cache
        if table.device == query.device and table.dtype == query.dtype:
            return table
        return table.to(query.device, dtype=query.dtype)
