"""RoPE in plain torch, for the attention schemes that rotate queries or keys on from where the
model's rotary put them (a score (R(a) q) . (R(b) k) depends only on a - b, and rotations compose).

    >>> inv_freq = inverse_frequencies(1e4, 8)
    >>> x = torch.randn(3, 8, dtype=torch.float64)
    >>> there = rotate(x, torch.tensor([2.0, 3.0, 4.0]), inv_freq)
    >>> back = rotate(there, torch.tensor([-2.0, -3.0, -4.0]), inv_freq)
    >>> torch.allclose(back, x)
    True
"""

from __future__ import annotations

import torch


def inverse_frequencies(theta: float, rotary_dim: int) -> torch.Tensor:
    """RoPE's per-pair frequencies theta^(-2m/d), float64."""
    return 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))


def rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """RoPE of x [..., n, d] at `positions` [n] (neox / rotate-half layout, as Llama), in x's dtype.

    Angles are computed in float64, so fractional and large positions lose nothing before the
    cast; only the first `2 * len(inv_freq)` dimensions rotate (partial rotary).
    """
    angles = positions.to(torch.float64)[:, None] * inv_freq.to(torch.float64)[None, :].to(positions.device)
    cos, sin = angles.cos().to(x.device, x.dtype), angles.sin().to(x.device, x.dtype)
    half = inv_freq.shape[0]
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)
