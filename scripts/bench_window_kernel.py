"""Window attention's kernel against plain fused attention, side by side, one layer of SmolLM2's
shape (9 query heads, 3 KV heads, head dim 64), float32, on this host's CPU threads.

For each row length n: a prefill chunk (the last `chunk` queries of the row) and a decode step
(one query), each as plain causal-free fused attention over all n keys (what one RoPE row costs)
and as `two_band_attention` under ReRoPE and Self-Extend, with the far keys rotated beforehand as
the engine's row copies keep them; prints milliseconds and the ratio.

    .venv/bin/python scripts/bench_window_kernel.py --lengths 8k,16k,32k --chunk 2048
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import torch

from server.engines.base import AttentionScheme
from server.engines.window_attention.kernel import far_keys, two_band_attention
from server.engines.window_attention.positions import inverse_frequencies

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64
SCHEMES = {
    "rerope w=4096 +logn": AttentionScheme("rerope", window=4096, logn_window=8192),
    "self_extend W=2048 G=4": AttentionScheme("self_extend", window=2048, group=4),
}


def best_of(repeats: int, fn: Callable[..., object], *args: object) -> float:
    """The fastest of `repeats` calls of fn(*args), in milliseconds."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - started)
    return min(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", default="8k,16k,32k")
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    inv_freq = inverse_frequencies(100000.0, HEAD_DIM)
    fused = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    print(f"torch threads: {torch.get_num_threads()}")
    print("| n | queries | plain fused (ms) | " + " | ".join(f"{name} (ms, ratio)" for name in SCHEMES) + " |")
    print("|---|---|---|" + "---|" * len(SCHEMES))
    for n in (int(float(x.rstrip("k")) * 1024) if x.endswith("k") else int(x) for x in args.lengths.split(",")):
        k, v = torch.randn(2, KV_HEADS, n, HEAD_DIM)
        for queries in (args.chunk, 1):
            q = torch.randn(queries, HEADS, HEAD_DIM)
            group = HEADS // KV_HEADS
            plain_q = q.transpose(0, 1).reshape(KV_HEADS, group * queries, HEAD_DIM)[None]
            plain = best_of(args.repeats, partial(fused, scale=HEAD_DIM**-0.5), plain_q, k[None], v[None])
            cells = []
            for scheme in SCHEMES.values():
                k_far = far_keys(k, 0, scheme, inv_freq)  # kept by the row copy, appended once per key
                attend = partial(two_band_attention, scale=HEAD_DIM**-0.5, k_far=k_far)
                ms = best_of(args.repeats, attend, q, k, v, n - queries, scheme, inv_freq)
                cells.append(f"{ms:.1f} ({ms / plain:.2f}x)")
            print(f"| {n:,} | {queries} | {plain:.1f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
