"""NBCE's arithmetic, in plain PyTorch: used by the engine's processor and by the test reference.

One step (Su Jianlin's reference, github.com/bojone/NBCE test.py), rows × vocab logits with
row 0 the question alone:

    logp    = log_softmax(logits)                         # every row
    logp    = top_p(logp)                                 # optional, per row
    H       = -(exp(logp) * clip(logp, -100, 0)).sum()    # entropy of each row
    H[prev] -= eta                                        # stickiness (after the first step)
    k       = argmin(H[1:]) + 1                           # pooling "min_entropy"
    merged  = (1 + beta) * logp[k] - beta * logp[0]    where logp[0] > -100, else logp[k]

then the token is drawn from `merged` (greedy: argmax).
"""

from __future__ import annotations

import zlib

import torch

from strategies.nbce.protocol import Combination, Draw

# Log-probabilities below this count as "impossible" (as in the reference's clip).
LOGP_FLOOR = -100.0


def top_p_filter(scores: torch.Tensor, top_p: float | None) -> torch.Tensor:
    """transformers' TopPLogitsWarper along the last axis: keep the smallest set of most likely
    tokens whose probability mass reaches `top_p`, the rest -inf."""
    if top_p is None or top_p >= 1.0:
        return scores
    sorted_scores, order = torch.sort(scores, descending=False, dim=-1)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - top_p)
    remove_sorted[..., -1:] = False
    return scores.masked_fill(remove_sorted.scatter(-1, order, remove_sorted), float("-inf"))


def combine(
    logits: torch.Tensor, combination: Combination, prev_k: int | None = None
) -> tuple[torch.Tensor, int | None]:
    """One NBCE step over `logits` (rows × vocab, row 0 unconditioned).

    Returns the merged scores over the vocabulary and the pooled row (None for `mean`)."""
    logp = top_p_filter(torch.log_softmax(logits.float(), dim=-1), combination.top_p)
    k: int | None = None
    if combination.pooling == "mean":
        pooled = logp[1:].mean(dim=0)
    elif combination.pooling == "max_prob":
        score = logp[1:].amax(dim=-1)
        if prev_k is not None:
            score[prev_k - 1] += combination.eta
        k = int(torch.argmax(score)) + 1
        pooled = logp[k]
    else:  # min_entropy
        entropy = -(logp.exp() * logp.clamp(LOGP_FLOOR, 0)).sum(dim=-1)
        if prev_k is not None:
            entropy[prev_k] -= combination.eta
        k = int(torch.argmin(entropy[1:])) + 1
        pooled = logp[k]
    uncond = logp[0]
    beta = combination.beta
    merged = torch.where(uncond > LOGP_FLOOR, (1 + beta) * pooled - beta * uncond, pooled)
    return merged, k


def choose_token(merged: torch.Tensor, draw: Draw, job: str, position: int) -> int:
    """The token at absolute `position`: argmax, or a draw seeded by (seed or job, position), so
    that a group resubmitted after falling out of step draws the same token again."""
    if draw.greedy:
        return int(torch.argmax(merged))
    scores = merged.float().cpu() / max(draw.temperature, 1e-5)
    if draw.top_k:
        kth = torch.topk(scores, min(draw.top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    scores = top_p_filter(scores, draw.top_p)
    seed = draw.seed if draw.seed is not None else zlib.crc32(job.encode())
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed * 1_000_003 + position)
    return int(torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator))
