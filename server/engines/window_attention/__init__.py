"""Window attention (issue 10): ReRoPE, Leaky ReRoPE, Self-Extend and log-n inside vLLM's CPU engine.

- positions.py: where each method rotates queries and keys (plain torch);
- kernel.py: `two_band_attention`, one row's attention from unrotated q/k (plain torch);
- paged.py: one row's keys and values read back from vLLM's paged CPU KV cache;
- step.py: which rows of the current model step use which scheme (the runner publishes it);
- impl.py: vLLM's CPU attention impl with those rows computed by the kernel.

docs/design/window-attention.md has the formulas, their sources and the costs.
"""
