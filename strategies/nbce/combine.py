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

`mean` pooling averages the context rows' log-probabilities (a product of the rows' distributions:
a token must be likely in every row). With `top_p` each row keeps only its nucleus, so a token
outside any one row's nucleus gets -inf; when the nuclei have no token in common, every pooled
score would be -inf and no token could be chosen (greedy would take token 0, sampling would fail
inside the engine). That step then pools by the rows' average *probability* over their nuclei
instead (a mixture: a token likely in some row), which keeps every row's nucleus candidates and
is never empty, since every nucleus holds at least one token.
"""

from __future__ import annotations

import math
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


def mean_pool(logp: torch.Tensor) -> torch.Tensor:
    """The context rows' (rows × vocab) mean log-probability; where that is -inf for every token
    (top_p nuclei without a common token), the log of their mean probability (module docstring)."""
    pooled = logp.mean(dim=0)
    if torch.isfinite(pooled).any():
        return pooled
    return torch.logsumexp(logp, dim=0) - math.log(logp.shape[0])


def combine(
    logits: torch.Tensor, combination: Combination, prev_k: int | None = None
) -> tuple[torch.Tensor, int | None]:
    """One NBCE step over `logits` (rows × vocab, row 0 unconditioned).

    Returns the merged scores over the vocabulary and the pooled row (None for `mean`)."""
    logp = top_p_filter(torch.log_softmax(logits.float(), dim=-1), combination.top_p)
    k: int | None = None
    if combination.pooling == "mean":
        pooled = mean_pool(logp[1:])
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
    merged = merged.float().cpu()
    merged = merged.masked_fill(merged.isnan(), float("-inf"))
    scores = merged / max(draw.temperature, 1e-5)
    if draw.top_k:
        kth = torch.topk(scores, min(draw.top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    scores = top_p_filter(scores, draw.top_p)
    if not torch.isfinite(scores).any():
        # Nothing to draw from (combine() always leaves a finite score; NaN logits would not), and
        # torch.multinomial would raise inside the engine core: take the greedy choice.
        return int(torch.argmax(merged))
    seed = draw.seed if draw.seed is not None else zlib.crc32(job.encode())
    generator = torch.Generator(device="cpu")
    # Within the 64 bits a generator's seed holds: a client's seed goes up to 2**63 - 1.
    generator.manual_seed((seed * 1_000_003 + position) % 2**64)
    return int(torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator))
