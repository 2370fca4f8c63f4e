"""A straightforward full-vocabulary NBCE on plain transformers: the tests' ground truth.

It follows the reference implementation (github.com/bojone/NBCE, test.py) step for step, with
the rows kept apart (one transformers KV cache per row, no padding, no vLLM) so that nothing but
the model's own arithmetic enters; each step combines the rows with NBCE's arithmetic
(strategies/nbce/combine.py, which tests/unit/test_nbce_unit.py checks against the formulas
written out) and takes the argmax.

It is slow (plain eager forward passes) and meant for tests and spot checks on short rows; the
server runs the same combination inside vLLM (strategies/nbce/processor.py). `reference_rows`
builds a string context's rows from the rule docs/CONTRACT.md states, written out here apart
from the server's chunking (strategies/nbce/chunking.py), which the unit tests check against it.

    .venv/bin/python -m tests.support.nbce_reference --context-file doc.txt --question "..." --max-new-tokens 32
"""

from __future__ import annotations

import argparse
import bisect
import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from server.ops.model_store import default_checkpoint_dir
from strategies.nbce.combine import combine
from strategies.nbce.protocol import Combination

SENTENCE_MARKS = ".!?;:。！？"


def reference_chunks(tokenizer: Any, text: str, budget: int) -> list[list[int]]:
    """`text`'s ids cut into chunks of at most `budget` tokens: each ends at the last paragraph break
    at or past 4/5 of the budget, else the last sentence end (a mark then whitespace; a paragraph
    break counts), else the last whitespace, else the last token boundary not inside a character;
    whitespace-only tokens at a cut are dropped."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    after = [end for _, end in encoded["offset_mapping"]]  # the character a cut after token i is at
    runs = [(m.start(), m.end()) for m in re.finditer(r"\s+", text)]
    starts = [a for a, _ in runs]

    def run_at(c: int) -> tuple[int, int]:
        k = bisect.bisect_right(starts, c) - 1
        return runs[k] if k >= 0 and runs[k][0] <= c <= runs[k][1] else (c, c)

    def rank(i: int) -> int:
        """How good a cut before token i is: 3 paragraph, 2 sentence, 1 word, 0 token, -1 none."""
        a, b = run_at(after[i - 1])
        if text.count("\n", a, b) >= 2:
            return 3
        if b > a and a > 0 and text[a - 1] in SENTENCE_MARKS:
            return 2
        if b > a:
            return 1
        return 0 if after[i - 1] < after[i] else -1

    def blank(i: int) -> bool:
        return text[after[i - 1] if i else 0 : after[i]].isspace()

    chunks, start = [], 0
    while start < len(ids):
        while start < len(ids) and blank(start):
            start += 1
        if start == len(ids):
            break
        stop = len(ids)
        if len(ids) - start > budget:
            cuts = range(start + 1, start + budget + 1)
            paragraphs = [i for i in cuts if rank(i) == 3 and i - start >= math.ceil(0.8 * budget)]
            stop = next(
                (
                    max(found)
                    for found in (paragraphs, *([i for i in cuts if rank(i) >= r] for r in (2, 1, 0)))
                    if found
                ),
                start + budget,
            )
        end = stop
        while end > start and blank(end - 1):
            end -= 1
        if end > start:
            chunks.append(ids[start:end])
        start = stop
    return chunks


def reference_rows(tokenizer: Any, document: str, question: str, budget: int) -> list[list[int]]:
    """A string context's NBCE rows: the question alone, then each chunk's ids followed by the ids of
    "\n\n" + question (tokenized as one string)."""
    after = tokenizer("\n\n" + question, add_special_tokens=False)["input_ids"]
    prefix = tokenizer("", add_special_tokens=True)["input_ids"]  # a BOS, for a tokenizer that adds one
    rows = [list(tokenizer(question)["input_ids"])]
    return rows + [[*prefix, *chunk, *after] for chunk in reference_chunks(tokenizer, document, budget)]


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
    with open(args.context_file) as f:
        text = f.read()
    rows = reference_rows(tok, text, args.question, args.chunk_tokens)
    model = load_model(args.model, getattr(torch, args.dtype))
    res = generate(model, rows, args.max_new_tokens, eos_token_ids=(tok.eos_token_id,))
    print(tok.decode(res.token_ids, skip_special_tokens=True))
    print(res.token_ids)


if __name__ == "__main__":
    main()
