"""Rows under an attention scheme (server/attention/) inside vLLM's CPU engine.

- paged.py: one row's keys and values read back from vLLM's paged CPU KV cache;
- row_cache.py: rows' contiguous copies of their keys and values (and far keys), grown step by step;
- step.py: which rows of the current model step run under which scheme (the runner publishes it);
- impl.py: vLLM's CPU attention impl, with those rows' queries scaled and their attention computed
  by their schemes.

docs/design/window-attention.md and docs/design/dual-chunk-attention.md have the formulas, their
sources and the costs.
"""
