"""The attention schemes beside plain attention, side by side, one layer of SmolLM2's shape
(9 query heads, 3 KV heads, head dim 64), float32, on this host's CPU threads.

For each row length n: a prefill chunk (the last `chunk` queries of the row) and a decode step (one
query), as
- vLLM's own CPU kernel over the paged cache (what a RoPE row costs in the engine: the reference),
- plain fused attention (PyTorch's flash kernel for CPU, over the contiguous keys, causal),
- each scheme's `attend` (server/attention/), its far keys computed beforehand, as the engine's row
  copies keep them, and its keys where its `table_positions` put them;
prints milliseconds and the ratio to vLLM's kernel.

    .venv/bin/python scripts/bench_window_kernel.py --lengths 8k,16k,32k,64k --chunk 2048
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from server.attention.dual_chunk import DualChunk
from server.attention.fused import attend
from server.attention.leaky_rerope import LeakyRerope
from server.attention.rerope import Rerope
from server.attention.rotary import inverse_frequencies
from server.attention.self_extend import SelfExtend
from server.attention.string import String
from server.engines.vllm_adapter.cpu_attention import one_row_paged_attention
from server.plan import AttentionScheme, RowKV

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 9, 3, 64, 128
SCALE = HEAD_DIM**-0.5
SCHEMES: dict[str, AttentionScheme] = {
    "rerope w=4096 +logn": Rerope(window=4096, logn_window=8192),
    "leaky w=4096 k=16 +logn": LeakyRerope(window=4096, leak=16.0, logn_window=8192),
    "self_extend W=2048 G=8": SelfExtend(window=2048, group=8),
    "dca S=2048 w=256": DualChunk(chunk_size=2048, local_window=256, trained_length=8192),
    "string S=2703 W=128 C=5616": String(shift=2703, local_window=128, cap=5616),
}


def best_of(repeats: int, fn: Callable[..., object], *args: object) -> float:
    """The fastest of `repeats` calls of fn(*args), in milliseconds (after one warm-up call)."""
    fn(*args)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - started)
    return min(times) * 1000


def fused_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Plain attention of the last C queries: the keys before them unmasked, the block causal."""
    queries, n = q.shape[0], k.shape[1]
    by_head = q.transpose(0, 1)
    folded = by_head.reshape(KV_HEADS, HEADS // KV_HEADS * queries, HEAD_DIM)[None]
    attend(folded, k[None, :, : n - queries], v[None, :, : n - queries], SCALE)
    group = HEADS // KV_HEADS
    block_k = k[:, n - queries :].repeat_interleave(group, 0)[None]
    attend(by_head[None], block_k, v[:, n - queries :].repeat_interleave(group, 0)[None], SCALE, causal=queries > 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", default="8k,16k,32k,64k")
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    inv_freq = inverse_frequencies(100000.0, HEAD_DIM)
    columns = ["plain fused", *SCHEMES]
    print(f"torch threads: {torch.get_num_threads()}")
    print("| n | queries | vLLM kernel (ms) | " + " | ".join(f"{c} (ms, x vLLM)" for c in columns) + " |")
    print("|---|---|---|" + "---|" * len(columns))
    for n in (int(float(x.rstrip("k")) * 1024) if x.endswith("k") else int(x) for x in args.lengths.split(",")):
        k, v = torch.randn(2, KV_HEADS, n, HEAD_DIM)
        for queries in (args.chunk, 1):
            q = torch.randn(queries, HEADS, HEAD_DIM)
            first = n - queries
            reference = best_of(args.repeats, one_row_paged_attention(q, k, v, BLOCK, SCALE))
            times = [best_of(args.repeats, fused_causal, q, k, v)]
            for scheme in SCHEMES.values():
                k_far = scheme.far_keys(k, 0, inv_freq)  # kept by the row copy, appended once per key
                row = RowKV(k, v, k if k_far is None else k_far)
                times.append(best_of(args.repeats, scheme.attend, q, row, first, inv_freq, SCALE))
            cells = " | ".join(f"{ms:.1f} ({ms / reference:.2f}x)" for ms in times)
            print(f"| {n:,} | {queries} | {reference:.1f} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
