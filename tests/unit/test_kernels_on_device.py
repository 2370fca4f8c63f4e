"""The attention schemes in float32 on every device this host has (CPU; CUDA where a GPU is
present: `pytest tests/unit/test_kernels_on_device.py` on a GPU host), against the reference in
float64 on the CPU. The schemes are plain PyTorch: on CUDA their fused parts run PyTorch's
memory-efficient kernel (server/attention/fused.py)."""

from __future__ import annotations

import pytest
import torch

from server.attention.dual_chunk import DualChunk
from server.attention.leaky_rerope import LeakyRerope
from server.attention.rerope import Rerope
from server.attention.self_extend import SelfExtend
from server.plan import AttentionScheme
from tests.support import window_reference as ref
from tests.support.served_scheme import reference, served

HEADS, KV_HEADS, D, N = 6, 2, 32, 300
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SCHEMES: list[AttentionScheme] = [
    Rerope(window=40, logn_window=64),
    LeakyRerope(window=40, leak=4.0),
    SelfExtend(window=48, group=4),
    DualChunk(chunk_size=96, local_window=16, trained_length=128),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.label())
def test_scheme_in_float32_on_the_device_matches_the_reference(scheme: AttentionScheme, device: str) -> None:
    gen = torch.Generator().manual_seed(11)
    q, k, v = (
        torch.randn(s, generator=gen, dtype=torch.float64) for s in [(N, HEADS, D), (KV_HEADS, N, D), (KV_HEADS, N, D)]
    )
    expected = reference(q, k, v, ref.Scheme.of(scheme))
    on_device = (t.float().to(device) for t in (q, k, v))
    got = served(scheme, *on_device, steps=[170, 100, 1, 1, 28])  # prefill in chunks, then decode
    assert got.device.type == device and got.dtype == torch.float32
    torch.testing.assert_close(got.cpu().double(), expected, rtol=1e-4, atol=1e-4)
