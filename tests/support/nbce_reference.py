"""A straightforward full-vocabulary NBCE on plain transformers: the tests' ground truth.

It follows the reference implementation (github.com/bojone/NBCE, test.py) step for step, with
the rows kept apart (one transformers KV cache per row, no padding, no vLLM) so that nothing but
the model's own arithmetic enters; each step combines the rows with NBCE's arithmetic
(strategies/nbce/combine.py, which tests/unit/test_nbce_unit.py checks against the formulas
written out) and takes the argmax.

It is slow (plain eager forward passes) and meant for tests and spot checks on short rows; the
server runs the same combination inside vLLM (strategies/nbce/processor.py).

    .venv/bin/python -m tests.support.nbce_reference --context-file doc.txt --question "..." --max-new-tokens 32
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

import torch

from server.ops.model_store import default_checkpoint_dir
from strategies.nbce.chunking import row_text, split_document
from strategies.nbce.combine import combine
from strategies.nbce.protocol import Combination


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
    combination: Combination | None = None,
    eos_token_ids: tuple[int, ...] = (),
    prefill_chunk: int = 2048,
) -> ReferenceResult:
    """Greedy NBCE over `rows` (row 0: the question alone). Stops after an EOS token (included)."""
    from transformers import DynamicCache

    caches = [DynamicCache() for _ in rows]
    last_logits = []
    for row, cache in zip(rows, caches, strict=False):
        ids = torch.tensor([row])
        out = None
        for start in range(0, len(row), prefill_chunk):
            out = model(input_ids=ids[:, start : start + prefill_chunk], past_key_values=cache, use_cache=True)
        last_logits.append(out.logits[0, -1])
    result = ReferenceResult(token_ids=[])
    prev_k = None
    for _ in range(max_new_tokens):
        merged, k = combine(torch.stack(last_logits), combination or Combination(), prev_k)
        top2 = merged.topk(2).values
        token = int(merged.argmax())
        result.token_ids.append(token)
        result.gaps.append(float(top2[0] - top2[1]))
        result.rows_chosen.append(k)
        prev_k = k
        if token in eos_token_ids:
            break
        step = torch.tensor([[token]])
        last_logits = [model(input_ids=step, past_key_values=cache, use_cache=True).logits[0, -1] for cache in caches]
    return result


def main() -> None:
    from transformers import AutoTokenizer

    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--model", default=str(default_checkpoint_dir()))
    ap.add_argument("--context-file", required=True)
    ap.add_argument("--question", required=True)
    ap.add_argument("--chunk-tokens", type=int, default=2048)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(args.model)

    def encode(text: str) -> list[int]:
        return list(tok.encode(text))

    with open(args.context_file) as f:
        text = f.read()
    docs = split_document(text, args.chunk_tokens, encode)
    rows = [encode(args.question)] + [encode(row_text(d, args.question)) for d in docs]
    model = load_model(args.model, getattr(torch, args.dtype))
    res = generate(model, rows, args.max_new_tokens, eos_token_ids=(tok.eos_token_id,))
    print(tok.decode(res.token_ids, skip_special_tokens=True))
    print(res.token_ids)


if __name__ == "__main__":
    main()
