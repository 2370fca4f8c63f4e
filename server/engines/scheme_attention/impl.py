"""vLLM 0.32's CPU attention impl, with the rows under an attention scheme served by their schemes.

Every row's keys enter the paged cache as the model's rotary rotated them, at the scheme's
`table_positions` (the runner hands the rotary those positions). Per step:

- every scheme row's queries are multiplied by its `query_scale`, where it has one (rotation is
  linear, so this is the score of the scaled unrotated query);
- rows whose scheme computes its attention: vLLM's kernel runs for the other rows only (a compacted
  sub-batch with its own scheduler metadata); each such row appends its new keys, read back from
  the paged cache, to its contiguous copy (row_cache.py; with its far keys where the scheme keeps
  them), and its scheme's `attend` computes its output from that copy.

Steps without scheme rows go to vLLM's kernel untouched.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from torch import nn

from server.engines.scheme_attention import step
from server.engines.scheme_attention.paged import probe_layout
from server.engines.scheme_attention.row_cache import ROW_CACHE
from server.engines.vllm_adapter import cpu_attention as vllm_cpu

log = logging.getLogger(__name__)


class SchemeCPUAttentionImpl(vllm_cpu.CpuAttentionImpl):  # type: ignore[misc]  # vLLM is untyped here
    def forward(
        self,
        layer: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: Any,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        plan = step.current()
        if attn_metadata is None or plan is None:
            return super().forward(
                layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale
            )
        starts = vllm_cpu.query_starts(attn_metadata)
        seq_lens = vllm_cpu.row_lengths(attn_metadata)
        rows = len(starts) - 1
        query = _scaled_queries(query, plan, starts, seq_lens)
        computed = [r for r in plan.computed_rows() if r < rows]
        if not computed:
            return super().forward(
                layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale
            )
        if len(computed) < rows:
            # The sub-batch is the same for every layer of the step: built once.
            memo_key = f"other_rows:{id(attn_metadata)}"
            other = plan.memo.get(memo_key)
            if other is None:
                other = plan.memo[memo_key] = self._other_rows(layer, query.dtype, attn_metadata, computed)
            tokens, sub_metadata = other
            sub_output = output.new_empty((len(tokens), *output.shape[1:]))
            super().forward(layer, query[tokens], key, value, kv_cache, sub_metadata, sub_output)
            output[tokens] = sub_output
        key_cache, value_cache = vllm_cpu.split_kv_cache(kv_cache)
        isa = vllm_cpu.layer_isa(layer)
        layout = probe_layout(isa, kv_cache.dtype, self.head_size, key_cache.shape[2])
        if layout is None:
            raise RuntimeError(f"scheme attention cannot read the {isa} KV cache layout")
        for r in computed:
            start, stop, n = starts[r], starts[r + 1], seq_lens[r]
            first = n - (stop - start)
            scheme = plan.schemes[r]
            assert scheme is not None  # a computed row has one
            far = functools.partial(scheme.far_keys, inv_freq=plan.inv_freq)
            block_ids = vllm_cpu.block_ids(attn_metadata, r)
            row = ROW_CACHE.read(
                plan.request_ids[r], id(self), key_cache, value_cache, block_ids, first, n, layout, far
            )
            output[start:stop] = scheme.attend(query[start:stop], row, first, plan.inv_freq, self.scale)
        return output

    def _other_rows(
        self, layer: Any, dtype: torch.dtype, attn_metadata: Any, computed: list[int]
    ) -> tuple[torch.Tensor, Any]:
        """The tokens of the rows whose attention no scheme computes, and vLLM metadata for them
        alone (a compacted sub-batch), so vLLM's kernel spends nothing on the scheme rows' tokens."""
        starts = vllm_cpu.query_starts(attn_metadata)
        skip = set(computed)
        keep = [r for r in range(len(starts) - 1) if r not in skip]
        tokens = torch.cat([torch.arange(starts[r], starts[r + 1]) for r in keep])
        return tokens, vllm_cpu.rows_metadata(self, layer, dtype, attn_metadata, keep)


def _scaled_queries(query: torch.Tensor, plan: step.StepPlan, starts: list[int], seq_lens: list[int]) -> torch.Tensor:
    """The step's queries, each scheme row's multiplied by its scheme's `query_scale`."""
    scaled = query
    for r, scheme in enumerate(plan.schemes[: len(starts) - 1]):
        if scheme is None:
            continue
        start, stop = starts[r], starts[r + 1]
        first = seq_lens[r] - (stop - start)
        factor = scheme.query_scale(torch.arange(first, first + stop - start), max(plan.lengths[r], seq_lens[r]))
        if factor is None:
            continue
        if scaled is query:
            scaled = query.clone()
        scaled[start:stop] *= factor.to(query.dtype)[:, None, None]
    return scaled


def install(model: nn.Module) -> int:
    """Make every CPU attention impl of `model` a `SchemeCPUAttentionImpl`; returns how many.
    Other backends (GPU) are left alone: the API process refuses attention schemes there."""
    count = vllm_cpu.swap_attention_impls(model, SchemeCPUAttentionImpl)
    log.info("scheme attention: installed in %d attention layers", count)
    return count
