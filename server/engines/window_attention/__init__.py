"""Attention that changes positions, inside vLLM's CPU engine: ReRoPE, Leaky ReRoPE, Self-Extend,
log-n, and Dual Chunk Attention.

- positions.py: where each method rotates queries and keys (plain torch);
- fused.py: fused attention with its log-sum-exp, and the merge of such parts (plain torch);
- kernel.py: `two_band_attention`, a window row's attention (plain torch);
- dual_chunk.py: `dual_chunk_attention`, a DCA row's attention (plain torch);
- paged.py: one row's keys and values read back from vLLM's paged CPU KV cache;
- row_cache.py: rows' contiguous copies of their keys and values, grown step by step;
- step.py: which rows of the current model step use which scheme (the runner publishes it);
- impl.py: vLLM's CPU attention impl with those rows computed by the kernels.

docs/design/window-attention.md and docs/design/dual-chunk-attention.md have the formulas, their
sources and the costs.
"""
