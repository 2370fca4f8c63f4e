"""RULER tasks through lm-evaluation-harness's own implementation (offline ones only).

lm-eval builds each task's samples for a length with the model's tokenizer (no download for the
tasks below) and sends them through its stock `local-completions` backend; `gen_kwargs` carry the
request's `strategy` into the body. Strategies that need a `context` (NBCE) get
`split: last_line`: the question is the prompt's last line.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from clients.eval.results import Score

# lm-eval's RULER tasks that need no download at run time (their haystacks are generated).
OFFLINE_TASKS = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_vt", "ruler_cwe", "ruler_fwe")
# Enough new tokens for each task's answer (lm-eval's defaults are 30-128).
ANSWER_TOKENS = {"ruler_vt": 30, "ruler_cwe": 60, "ruler_fwe": 40}
DEFAULT_ANSWER_TOKENS = 24


def lm_eval_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """The strategy as lm-eval sends it: NBCE splits the plain prompt at its last line."""
    if spec.get("name") == "nbce" and "split" not in spec:
        return {**spec, "split": "last_line"}
    return spec


def run_cell(url: str, model: str, tokenizer: str, task: str, spec: dict[str, Any], length: int, samples: int) -> Score:
    import lm_eval

    logging.getLogger("lm-eval").setLevel(logging.WARNING)
    started = time.perf_counter()
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={
            "model": model,
            "base_url": f"{url}/v1/completions",
            "tokenizer": tokenizer,
            "tokenizer_backend": "huggingface",
            "max_length": length + 512,
            "max_retries": 1,
        },
        tasks=[task],
        limit=samples,
        metadata={"max_seq_lengths": [length]},
        gen_kwargs={"strategy": lm_eval_spec(spec), "max_gen_toks": ANSWER_TOKENS.get(task, DEFAULT_ANSWER_TOKENS)},
        log_samples=False,
        verbosity="WARNING",
    )
    value = float(results["results"][task][f"{length},none"])
    return Score(
        correct=value * samples,
        trials=samples,
        seconds=(time.perf_counter() - started) / samples,
        strategy=lm_eval_spec(spec),
    )
