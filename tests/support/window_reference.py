"""Plain-PyTorch reference of the windowed position schemes (issue 10), written from the formulas.

A Llama forward pass (gpt-fast style: the math visible, no caches, O(n^2) attention) whose attention
scores each (query i, key j) pair with one of two rotations:

- inside the window (i - j < w): q rotated at i, k at j (ordinary RoPE: relative position i - j);
- outside it: q rotated at a(i), k at b(j), the scheme's own positions:

  | scheme        | a(i)                     | b(j)     | relative position a(i) - b(j)  |
  |---------------|--------------------------|----------|--------------------------------|
  | rerope        | w                        | 0        | w                              |
  | leaky_rerope  | w - w/k + i/k            | j/k      | w + (i - j - w)/k              |
  | self_extend   | i//G + W - W//G          | j//G     | grouped distance, shifted      |

(bojone/rerope rerope_patch.py and leaky_rerope_patch.py; datamllab/LongLM self_extend_patch; the
design note docs/design/window-attention.md quotes the lines.) log-n scaling multiplies the
unrotated query at position i by max(1, ln(i + 1) / ln L0).

    >>> scheme = Scheme("rerope", window=4)
    >>> relative_positions(scheme, 8)[7].tolist()
    [4.0, 4.0, 4.0, 4.0, 3.0, 2.0, 1.0, 0.0]
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # only the type: the reference computes nothing with the engine's code
    from server.engines.base import AttentionScheme

SchemeKind = Literal["native", "rerope", "leaky_rerope", "self_extend"]


@dataclass(frozen=True)
class Scheme:
    kind: SchemeKind = "native"
    # rerope / leaky_rerope: the window w; self_extend: the neighbour window W.
    window: int = 0
    # leaky_rerope: the slope 1/k beyond the window.
    k: float = 1.0
    # self_extend: the group size G.
    group: int = 1
    # log-n scaling past the native window L0 (None: off).
    logn_window: int | None = None

    @classmethod
    def of(cls, attention: AttentionScheme) -> Scheme:
        """The reference's scheme for the engine API's `AttentionScheme` (the same parameters)."""
        kind = attention.kind or "native"
        return cls(kind, attention.window, attention.leak, attention.group, attention.logn_window)

    def outside_positions(self, i: torch.Tensor, j: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a(i), b(j)): where the query and the key are rotated for a pair outside the window."""
        w = float(self.window)
        if self.kind == "rerope":
            return torch.full_like(i, w), torch.zeros_like(j)
        if self.kind == "leaky_rerope":
            return w - w / self.k + i / self.k, j / self.k
        if self.kind == "self_extend":
            g, big_w = self.group, self.window
            return torch.div(i, g, rounding_mode="floor") + big_w - big_w // g, torch.div(j, g, rounding_mode="floor")
        return i, j

    def inside(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Pairs scored with ordinary RoPE (all of them for `native`)."""
        if self.kind == "native":
            return torch.ones(i.shape[0], j.shape[-1], dtype=torch.bool)
        return (i[:, None] - j[None, :]) < self.window


def relative_positions(scheme: Scheme, n: int) -> torch.Tensor:
    """The relative position each (i, j), j <= i, is scored at (NaN above the diagonal)."""
    pos = torch.arange(n, dtype=torch.float64)
    a, b = scheme.outside_positions(pos, pos)
    inside = scheme.inside(pos, pos)
    rel = torch.where(inside, pos[:, None] - pos[None, :], a[:, None] - b[None, :])
    return rel.masked_fill(pos[None, :] > pos[:, None], float("nan"))


# --- the model ------------------------------------------------------------------------------


@dataclass
class LlamaWeights:
    config: dict[str, object]
    tensors: dict[str, torch.Tensor]

    @classmethod
    def load(cls, checkpoint: str | Path) -> LlamaWeights:
        from safetensors.torch import load_file

        path = Path(checkpoint)
        config = json.loads((path / "config.json").read_text())
        tensors = {k: v.float() for k, v in load_file(str(path / "model.safetensors")).items()}
        return cls(config, tensors)

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def int(self, key: str) -> int:
        value = self.config[key]
        assert isinstance(value, int | float)
        return int(value)


def rotate(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE (rotate-half, as HF Llama) of x [heads, n, d] at `positions` [n] (fractions allowed)."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(x.dtype)
    sin = torch.cat([angles.sin(), angles.sin()], -1).to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scheme: Scheme, theta: float) -> torch.Tensor:
    """Causal attention of q [h, n, d] over k, v [h, n, d] under `scheme` (two score matrices)."""
    n, d = q.shape[1], q.shape[-1]
    pos = torch.arange(n)
    if scheme.logn_window is not None:
        scale = (torch.log(pos.to(torch.float64) + 1) / math.log(scheme.logn_window)).clamp(min=1)
        q = q * scale.to(q.dtype)[None, :, None]
    inside = rotate(q, pos, theta) @ rotate(k, pos, theta).transpose(-1, -2)
    a, b = scheme.outside_positions(pos.to(torch.float64), pos.to(torch.float64))
    outside = rotate(q, a, theta) @ rotate(k, b, theta).transpose(-1, -2)
    scores = torch.where(scheme.inside(pos, pos), inside, outside) / math.sqrt(d)
    scores = scores.masked_fill(pos[None, :] > pos[:, None], float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(v.dtype) @ v


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def logits(weights: LlamaWeights, token_ids: list[int], scheme: Scheme = Scheme()) -> torch.Tensor:
    """Next-token logits [n, vocab] of a Llama checkpoint for `token_ids` under `scheme`."""
    cfg = weights.config
    heads, kv_heads = weights.int("num_attention_heads"), weights.int("num_key_value_heads")
    hidden = weights.int("hidden_size")
    head_dim = int(cfg.get("head_dim") or hidden // heads)  # type: ignore[call-overload]
    rope = cfg.get("rope_parameters") or {}
    theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))  # type: ignore[union-attr, arg-type]
    eps = float(cfg.get("rms_norm_eps", 1e-6))  # type: ignore[arg-type]
    w = weights.get
    x = w("model.embed_tokens.weight")[torch.tensor(token_ids)]
    n = x.shape[0]
    for layer in range(weights.int("num_hidden_layers")):
        p = f"model.layers.{layer}."
        h = rms_norm(x, w(p + "input_layernorm.weight"), eps)
        q = (h @ w(p + "self_attn.q_proj.weight").T).view(n, heads, head_dim).transpose(0, 1)
        k = (h @ w(p + "self_attn.k_proj.weight").T).view(n, kv_heads, head_dim).transpose(0, 1)
        v = (h @ w(p + "self_attn.v_proj.weight").T).view(n, kv_heads, head_dim).transpose(0, 1)
        k, v = k.repeat_interleave(heads // kv_heads, 0), v.repeat_interleave(heads // kv_heads, 0)
        out = attention(q, k, v, scheme, theta).transpose(0, 1).reshape(n, heads * head_dim)
        x = x + out @ w(p + "self_attn.o_proj.weight").T
        h = rms_norm(x, w(p + "post_attention_layernorm.weight"), eps)
        gate, up = h @ w(p + "mlp.gate_proj.weight").T, h @ w(p + "mlp.up_proj.weight").T
        x = x + (F.silu(gate) * up) @ w(p + "mlp.down_proj.weight").T
    x = rms_norm(x, w("model.norm.weight"), eps)
    head = weights.tensors.get("lm_head.weight", w("model.embed_tokens.weight"))
    return x @ head.T
