"""The window and DCA kernels in float32 on every device this host has (CPU; CUDA where a GPU is
present: `pytest tests/unit/test_kernels_on_device.py` on a GPU host), against the reference in
float64 on the CPU. The kernels are plain PyTorch: on CUDA their fused parts run PyTorch's
memory-efficient kernel (server/engines/window_attention/fused.py)."""

from __future__ import annotations

import pytest
import torch

from server.engines.base import AttentionScheme
from server.engines.window_attention.dual_chunk import dual_chunk_attention
from server.engines.window_attention.kernel import two_band_attention
from server.engines.window_attention.positions import inverse_frequencies, table_positions
from tests.support import window_reference as ref

THETA = 10000.0
HEADS, KV_HEADS, D, N = 6, 2, 32, 300
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SCHEMES = [
    AttentionScheme("rerope", window=40, logn_window=64),
    AttentionScheme("leaky_rerope", window=40, leak=4.0),
    AttentionScheme("self_extend", window=48, group=4),
    AttentionScheme("dca", chunk_size=96, local_window=16),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.label())
def test_kernel_in_float32_on_the_device_matches_the_reference(scheme: AttentionScheme, device: str) -> None:
    gen = torch.Generator().manual_seed(11)
    q, k, v = (
        torch.randn(s, generator=gen, dtype=torch.float64) for s in [(N, HEADS, D), (KV_HEADS, N, D), (KV_HEADS, N, D)]
    )
    group = HEADS // KV_HEADS
    expected = ref.attention(
        q.transpose(0, 1), k.repeat_interleave(group, 0), v.repeat_interleave(group, 0), ref.Scheme.of(scheme), THETA
    ).transpose(0, 1)
    # What the engine hands the kernel: q and k rotated where its rotary put them.
    at = table_positions(scheme, torch.arange(N))
    q_in = ref.rotate(q.transpose(0, 1), at, THETA).transpose(0, 1).float().to(device)
    k_in, v_in = ref.rotate(k, at, THETA).float().to(device), v.float().to(device)
    inv_freq = inverse_frequencies(THETA, D)
    outs, first = [], 0
    for size in (170, 100, 1, 1, 28):  # prefill in chunks, then decode
        stop = first + size
        args = (q_in[first:stop], k_in[:, :stop], v_in[:, :stop], first, scheme, inv_freq, D**-0.5)
        outs.append(dual_chunk_attention(*args) if scheme.kind == "dca" else two_band_attention(*args))
        first = stop
    got = torch.cat(outs)
    assert got.device.type == device and got.dtype == torch.float32
    torch.testing.assert_close(got.cpu().double(), expected, rtol=1e-4, atol=1e-4)
