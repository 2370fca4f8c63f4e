"""The position-changing kernels beside plain attention, side by side, one layer of SmolLM2's shape
(9 query heads, 3 KV heads, head dim 64), float32, on this host's CPU threads.

For each row length n: a prefill chunk (the last `chunk` queries of the row) and a decode step (one
query), as
- vLLM's own CPU kernel over the paged cache (what a RoPE row costs in the engine: the reference),
- plain fused attention (PyTorch's flash kernel for CPU, over the contiguous keys, causal),
- `two_band_attention` under ReRoPE, Leaky ReRoPE and Self-Extend (far keys rotated beforehand, as
  the engine's row copies keep them), and `dual_chunk_attention` (DCA, keys at j mod c);
prints milliseconds and the ratio to vLLM's kernel.

    .venv/bin/python scripts/bench_window_kernel.py --lengths 8k,16k,32k,64k --chunk 2048
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import torch

from server.engines.base import AttentionScheme
from server.engines.window_attention.dual_chunk import dual_chunk_attention
from server.engines.window_attention.fused import attend
from server.engines.window_attention.kernel import far_keys, two_band_attention
from server.engines.window_attention.positions import inverse_frequencies

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 9, 3, 64, 128
SCALE = HEAD_DIM**-0.5
WINDOWS = {
    "rerope w=4096 +logn": AttentionScheme("rerope", window=4096, logn_window=8192),
    "leaky w=4096 k=16 +logn": AttentionScheme("leaky_rerope", window=4096, leak=16.0, logn_window=8192),
    "self_extend W=2048 G=8": AttentionScheme("self_extend", window=2048, group=8),
}
DCA = AttentionScheme("dca", chunk_size=6144, local_window=1024)


def best_of(repeats: int, fn: Callable[..., object], *args: object) -> float:
    """The fastest of `repeats` calls of fn(*args), in milliseconds (after one warm-up call)."""
    fn(*args)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - started)
    return min(times) * 1000


def vllm_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Callable[[], None]:
    """vLLM 0.32's CPU attention over a paged cache holding k, v: q [C, heads, d] the last C queries."""
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    n, queries = k.shape[1], q.shape[0]
    isa = _get_attn_isa(torch.float32, BLOCK, HEAD_DIM)
    blocks = -(-n // BLOCK)
    cache = torch.zeros(blocks, KV_HEADS, 2 * BLOCK, HEAD_DIM)
    key_cache, value_cache = cache.chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(k.transpose(0, 1), v.transpose(0, 1), key_cache, value_cache, torch.arange(n), isa)
    starts = torch.tensor([0, queries], dtype=torch.int32)
    lengths = torch.tensor([n], dtype=torch.int32)
    table = torch.arange(blocks, dtype=torch.int32)[None]
    metadata = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=1, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, seq_lens=lengths,
        dtype=torch.float32, query_start_loc=starts, causal=True, sliding_window_size=-1, isa=isa,
        enable_kv_split=False,
    )  # fmt: skip
    out = torch.empty_like(q)

    def run() -> None:
        ops.cpu_attention_with_kv_cache(
            q, key_cache, value_cache, out, starts, lengths, SCALE, True, None, -1, table, 0.0, metadata, None
        )

    return run


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
    columns = ["plain fused", *WINDOWS, "dca S=6144 w=1024"]
    print(f"torch threads: {torch.get_num_threads()}")
    print("| n | queries | vLLM kernel (ms) | " + " | ".join(f"{c} (ms, x vLLM)" for c in columns) + " |")
    print("|---|---|---|" + "---|" * len(columns))
    for n in (int(float(x.rstrip("k")) * 1024) if x.endswith("k") else int(x) for x in args.lengths.split(",")):
        k, v = torch.randn(2, KV_HEADS, n, HEAD_DIM)
        for queries in (args.chunk, 1):
            q = torch.randn(queries, HEADS, HEAD_DIM)
            first = n - queries
            reference = best_of(args.repeats, vllm_kernel(q, k, v))
            times = [best_of(args.repeats, fused_causal, q, k, v)]
            for scheme in WINDOWS.values():
                k_far = far_keys(k, 0, scheme, inv_freq)  # kept by the row copy, appended once per key
                attend_window = partial(two_band_attention, scale=SCALE, k_far=k_far)
                times.append(best_of(args.repeats, attend_window, q, k, v, first, scheme, inv_freq))
            times.append(best_of(args.repeats, dual_chunk_attention, q, k, v, first, DCA, inv_freq, SCALE))
            cells = " | ".join(f"{ms:.1f} ({ms / reference:.2f}x)" for ms in times)
            print(f"| {n:,} | {queries} | {reference:.1f} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
