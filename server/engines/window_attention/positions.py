"""Where each window scheme rotates queries and keys, and log-n's query scale (plain torch).

A score (R(a) q) . (R(b) k) depends only on a - b, so every scheme is "the query at a(i), the key at
b(j)": inside the window (i - j < w) a = i, b = j (ordinary RoPE); beyond it the scheme's own pair
(server/engines/base.py `AttentionScheme`). Positions may be fractional (leaky_rerope).

    >>> from server.engines.base import AttentionScheme
    >>> i = torch.tensor([10.0]); j = torch.tensor([0.0, 4.0])
    >>> a, b = outside_positions(AttentionScheme("self_extend", window=4, group=2), i, j)
    >>> (a[:, None] - b[None, :]).tolist()   # i//2 + 4 - 2 - j//2
    [[7.0, 5.0]]
"""

from __future__ import annotations

import math

import torch

from server.engines.base import AttentionScheme


def outside_positions(scheme: AttentionScheme, i: torch.Tensor, j: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a(i), b(j)) for pairs beyond the window, as float64."""
    i, j = i.to(torch.float64), j.to(torch.float64)
    w = float(scheme.window)
    if scheme.kind == "rerope":
        return torch.full_like(i, w), torch.zeros_like(j)
    if scheme.kind == "leaky_rerope":
        return w - w / scheme.leak + i / scheme.leak, j / scheme.leak
    if scheme.kind == "self_extend":
        g = scheme.group
        return torch.floor(i / g) + (scheme.window - scheme.window // g), torch.floor(j / g)
    raise ValueError(f"no window scheme: {scheme}")


def table_positions(scheme: AttentionScheme, positions: torch.Tensor) -> torch.Tensor:
    """Where the model's rotary rotates a row's tokens under `scheme`, so that the paged cache holds
    the keys where the attention reads them: DCA at i mod c (every part reads a key there); the
    window kinds at i itself (their band reads keys there; far keys are rotated on once, when the
    row copy appends them)."""
    if scheme.kind == "dca":
        return positions % scheme.chunk_len
    return positions


def logn_scale(scheme: AttentionScheme, positions: torch.Tensor) -> torch.Tensor | None:
    """max(1, ln(i + 1) / ln L0) per position (float64), or None when log-n is off."""
    if scheme.logn_window is None:
        return None
    return (torch.log(positions.to(torch.float64) + 1) / math.log(scheme.logn_window)).clamp(min=1.0)


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
