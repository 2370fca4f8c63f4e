"""vLLM 0.32's CPU attention impl, with window, DCA and log-n rows computed by the kernels here.

Every row's keys enter the paged cache as the model's rotary rotated them: window rows at their own
positions, DCA rows at i mod c (the runner hands the rotary those positions). A step appends the
row's new keys, read back from the paged cache, to the row's contiguous copy (row_cache.py; with
their far rotation b(j) where the scheme has one, rotated once), and the kernel reads that. Per step:

- rows with log-n only (a RoPE strategy with `logn`): their queries are scaled by s(i) before
  vLLM's kernel (rotation is linear, so this is the score of the scaled unrotated query);
- window and DCA rows: vLLM's kernel runs for the other rows only (a compacted sub-batch with its
  own scheduler metadata), and each such row's output is computed from its keys and values.

Steps without such rows go to vLLM's kernel untouched.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from server.engines.vllm_adapter import cpu_attention as vllm_cpu
from server.engines.window_attention import step
from server.engines.window_attention.dual_chunk import dual_chunk_attention
from server.engines.window_attention.kernel import far_rotation, two_band_attention
from server.engines.window_attention.paged import probe_layout
from server.engines.window_attention.positions import logn_scale
from server.engines.window_attention.row_cache import ROW_CACHE

log = logging.getLogger(__name__)


class WindowCPUAttentionImpl(vllm_cpu.CpuAttentionImpl):  # type: ignore[misc]  # vLLM is untyped here
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
        schemes = plan.schemes[: len(starts) - 1]
        window_rows = [r for r in plan.window_rows() if r < len(schemes)]
        query = self._scale_logn_rows(query, schemes, starts, seq_lens)
        if not window_rows:
            return super().forward(
                layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale
            )
        if len(window_rows) < len(schemes):
            # The sub-batch is the same for every layer of the step: built once.
            memo_key = f"other_rows:{id(attn_metadata)}"
            other = plan.memo.get(memo_key)
            if other is None:
                other = plan.memo[memo_key] = self._other_rows(layer, query.dtype, attn_metadata, window_rows)
            tokens, sub_metadata = other
            sub_output = output.new_empty((len(tokens), *output.shape[1:]))
            super().forward(layer, query[tokens], key, value, kv_cache, sub_metadata, sub_output)
            output[tokens] = sub_output
        key_cache, value_cache = vllm_cpu.split_kv_cache(kv_cache)
        isa = vllm_cpu.layer_isa(layer)
        layout = probe_layout(isa, kv_cache.dtype, self.head_size, key_cache.shape[2])
        if layout is None:
            raise RuntimeError(f"window attention cannot read the {isa} KV cache layout")
        for r in window_rows:
            start, stop, n = starts[r], starts[r + 1], seq_lens[r]
            first = n - (stop - start)
            block_ids = vllm_cpu.block_ids(attn_metadata, r)
            scheme = schemes[r]
            assert scheme is not None
            far = far_rotation(scheme, plan.inv_freq)
            row = ROW_CACHE.read(
                plan.request_ids[r], id(self), key_cache, value_cache, block_ids, first, n, layout, far
            )
            if scheme.kind == "dca":
                output[start:stop] = dual_chunk_attention(
                    query[start:stop], row.keys, row.values, first, scheme, plan.inv_freq, self.scale
                )
            else:
                output[start:stop] = two_band_attention(
                    query[start:stop], row.keys, row.values, first, scheme, plan.inv_freq, self.scale, row.far_keys
                )
        return output

    def _other_rows(
        self, layer: Any, dtype: torch.dtype, attn_metadata: Any, window_rows: list[int]
    ) -> tuple[torch.Tensor, Any]:
        """The tokens of the rows that are not window rows, and vLLM metadata for them alone (a
        compacted sub-batch), so vLLM's kernel spends nothing on the window rows' tokens."""
        starts = vllm_cpu.query_starts(attn_metadata)
        skip = set(window_rows)
        keep = [r for r in range(len(starts) - 1) if r not in skip]
        tokens = torch.cat([torch.arange(starts[r], starts[r + 1]) for r in keep])
        return tokens, vllm_cpu.rows_metadata(self, layer, dtype, attn_metadata, keep)

    @staticmethod
    def _scale_logn_rows(
        query: torch.Tensor, schemes: tuple[Any, ...], starts: list[int], seq_lens: list[int]
    ) -> torch.Tensor:
        """Queries of log-n rows without a window scaled by s(i) (window rows: in the kernel)."""
        rows = [r for r, s in enumerate(schemes) if s is not None and s.kind is None and s.logn_window is not None]
        if not rows:
            return query
        query = query.clone()
        for r in rows:
            start, stop = starts[r], starts[r + 1]
            first = seq_lens[r] - (stop - start)
            scale = logn_scale(schemes[r], torch.arange(first, first + stop - start))
            assert scale is not None
            query[start:stop] *= scale.to(query.dtype)[:, None, None]
        return query


def install(model: nn.Module) -> int:
    """Make every CPU attention impl of `model` a `WindowCPUAttentionImpl`; returns how many.
    Other backends (GPU) are left alone: the API process refuses window schemes there."""
    count = vllm_cpu.swap_attention_impls(model, WindowCPUAttentionImpl)
    log.info("window attention: installed in %d attention layers", count)
    return count
