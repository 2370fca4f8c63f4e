"""Fused softmax attention that also returns its log-sum-exp, and the merge of such parts.

Attention over the union of disjoint key sets is the merge of each set's attention weighted by its
log-sum-exp, so a row whose keys are seen at different query rotations (window kinds, DCA) is a
few fused calls and a merge, never a score matrix. On CPU this is PyTorch's flash kernel for CPU;
on CUDA its memory-efficient kernel (float32 as well as half precision). vLLM's CPU attention
kernel returns no log-sum-exp, so it cannot serve such parts.

    >>> q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    >>> out, lse = attend(q, k, v, 8**-0.5)
    >>> halves = [attend(q, k[:, :, :2], v[:, :, :2], 8**-0.5), attend(q, k[:, :, 2:], v[:, :, 2:], 8**-0.5)]
    >>> torch.allclose(merge(halves), out, atol=1e-6)
    True
"""

from __future__ import annotations

import torch


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    causal: bool = False,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [B, H, L, d] over k, v [B, H, S, d] and its log-sum-exp [B, H, L] (natural
    log, scale included). `causal`: query t sees keys 0..t (top-left aligned); `mask`: an additive
    float mask broadcastable to [B, H, L, S]."""
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, is_causal=causal, attn_mask=mask, scale=scale
        )
        return out, lse
    out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, mask, True, is_causal=causal, scale=scale
    )
    return out, lse[..., : q.shape[2]]


def merge(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Softmax attention over the union of disjoint key sets, from each set's output and log-sum-exp.
    A set whose log-sum-exp is -inf (no key) weighs nothing."""
    if len(parts) == 1:
        return parts[0][0]
    top = torch.stack([lse for _, lse in parts]).amax(0)
    weights = [(lse - top).exp() for _, lse in parts]
    total = sum(weights)
    return sum(out * (weight / total)[..., None] for (out, _), weight in zip(parts, weights, strict=True))


def fold_heads(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[heads, c, d] -> [kv_heads, group * c, d]: each KV head's query heads one after another, so
    grouped-query attention needs no repeated keys."""
    heads, c, d = x.shape
    return x.reshape(kv_heads, (heads // kv_heads) * c, d)


def unfold_heads(x: torch.Tensor, c: int) -> torch.Tensor:
    """[kv_heads, group * c, d] -> [c, heads, d]."""
    kv_heads, gc, d = x.shape
    return x.reshape(kv_heads * (gc // c), c, d).transpose(0, 1)
