"""A straightforward full-vocabulary NBCE in plain PyTorch + transformers: the ground truth.

It follows the reference implementation (github.com/bojone/NBCE, test.py) step for step, with
the rows kept apart (one KV cache per row, no padding) so that nothing but the model's own
arithmetic enters:

    logp    = log_softmax(logits of every row)           # row 0: the question alone
    logp    = top_p(logp)                                # optional, per row
    H       = -(exp(logp) * clip(logp, -100, 0)).sum()   # entropy of each row
    H[prev] -= eta                                       # stickiness (after the first step)
    k       = argmin(H[1:]) + 1                          # pooling "min_entropy"
    merged  = (1 + beta) * logp[k] - beta * logp[0]   where logp[0] > -100, else logp[k]
    token   = argmax(merged)                             # greedy

It is slow (plain eager forward passes) and meant for tests and spot checks on short rows; the
server runs the same combination inside vLLM (server/engines/nbce_processor.py).

    python -m strategies.nbce_reference --context-file doc.txt --question "..." --max-new-tokens 32
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

import torch


def top_p_filter(logp: torch.Tensor, top_p: float | None) -> torch.Tensor:
    """transformers' TopPLogitsWarper on log-probabilities (rows × vocab): keep the smallest set
    of most likely tokens whose mass reaches top_p, the rest -inf."""
    if top_p is None or top_p >= 1.0:
        return logp
    sorted_logp, order = torch.sort(logp, descending=False, dim=-1)
    cumulative = sorted_logp.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - top_p)
    remove_sorted[..., -1:] = False
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logp.masked_fill(remove, float("-inf"))


def combine(
    logits: torch.Tensor,
    beta: float = 0.25,
    pooling: str = "min_entropy",
    eta: float = 0.0,
    prev_k: int | None = None,
    top_p: float | None = None,
) -> tuple[torch.Tensor, int | None]:
    """One NBCE step. `logits`: (rows × vocab), row 0 the unconditioned one.

    Returns the merged log-scores over the vocabulary and the pooled row (None for `mean`)."""
    logp = logits.float().log_softmax(dim=-1)
    logp = top_p_filter(logp, top_p)
    k: int | None
    if pooling == "min_entropy":
        entropy = -(logp.exp() * logp.clip(-100, 0)).sum(dim=-1)
        if prev_k is not None:
            entropy[prev_k] -= eta
        k = int(entropy[1:].argmin()) + 1
        pooled = logp[k]
    elif pooling == "max_prob":
        score = logp[1:].max(dim=-1).values
        if prev_k is not None:
            score[prev_k - 1] += eta
        k = int(score.argmax()) + 1
        pooled = logp[k]
    elif pooling == "mean":
        k = None
        pooled = logp[1:].mean(dim=0)
    else:
        raise ValueError(f"unknown pooling {pooling!r}")
    uncond = logp[0]
    merged = (1 + beta) * pooled - beta * uncond
    merged = torch.where(uncond > -100, merged, pooled)
    return merged, k


@dataclass
class ReferenceResult:
    token_ids: list[int]
    gaps: list[float] = field(default_factory=list)  # top-1 minus top-2 merged score, per step
    rows_chosen: list[int | None] = field(default_factory=list)


def load_model(path: str, dtype: torch.dtype = torch.float32) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype)
    model.eval()
    return model


@torch.inference_mode()
def generate(
    model: Any,
    rows: list[list[int]],
    max_new_tokens: int,
    beta: float = 0.25,
    pooling: str = "min_entropy",
    eta: float = 0.0,
    top_p: float | None = None,
    eos_token_ids: tuple[int, ...] = (),
    prefill_chunk: int = 2048,
) -> ReferenceResult:
    """Greedy NBCE over `rows` (row 0: the question alone). Stops after an EOS token (included)."""
    from transformers import DynamicCache

    caches = [DynamicCache() for _ in rows]
    last_logits = []
    for row, cache in zip(rows, caches):
        ids = torch.tensor([row])
        out = None
        for start in range(0, len(row), prefill_chunk):
            out = model(input_ids=ids[:, start : start + prefill_chunk], past_key_values=cache, use_cache=True)
        last_logits.append(out.logits[0, -1])
    result = ReferenceResult(token_ids=[])
    prev_k = None
    for _ in range(max_new_tokens):
        merged, k = combine(torch.stack(last_logits), beta, pooling, eta, prev_k, top_p)
        top2 = merged.topk(2).values
        token = int(merged.argmax())
        result.token_ids.append(token)
        result.gaps.append(float(top2[0] - top2[1]))
        result.rows_chosen.append(k)
        prev_k = k
        if token in eos_token_ids:
            break
        step = torch.tensor([[token]])
        last_logits = [
            model(input_ids=step, past_key_values=cache, use_cache=True).logits[0, -1] for cache in caches
        ]
    return result


def main() -> None:
    import os

    from transformers import AutoTokenizer

    from strategies.nbce import split_document, row_text

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=os.path.expanduser("~/.cache/ropeserve/models/SmolLM2-135M-Instruct"))
    ap.add_argument("--context-file", required=True)
    ap.add_argument("--question", required=True)
    ap.add_argument("--chunk-tokens", type=int, default=2048)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(args.model)
    encode = lambda text: tok.encode(text)  # noqa: E731
    text = open(args.context_file).read()
    docs = split_document(text, args.chunk_tokens, encode)
    rows = [encode(args.question)] + [encode(row_text(d, args.question)) for d in docs]
    model = load_model(args.model, getattr(torch, args.dtype))
    res = generate(model, rows, args.max_new_tokens, eos_token_ids=(tok.eos_token_id,))
    print(tok.decode(res.token_ids, skip_special_tokens=True))
    print(res.token_ids)


if __name__ == "__main__":
    main()
