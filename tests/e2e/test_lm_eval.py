"""lm-evaluation-harness, unchanged, against the real server: its stock `local-completions`
backend runs a loglikelihood task and a generation task (both from local files, no download),
the generation task under a per-request strategy (`--gen_kwargs`). The loglikelihoods it reports
are compared with a plain transformers forward pass of the same model (float32 engine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from server.ops.model_store import default_checkpoint_dir
from tests.support.metrics_text import scrape

pytestmark = [pytest.mark.engine, pytest.mark.default_tier]

TASKS = Path(__file__).parent / "lm_eval_tasks"
STRATEGY = {"name": "yarn", "factor": 2}


def task_dir(tmp_path: Path) -> Path:
    """The task YAMLs with the data files' absolute path filled in."""
    out = tmp_path / "tasks"
    out.mkdir()
    for template in TASKS.glob("*.yaml.in"):
        (out / template.name.removesuffix(".in")).write_text(template.read_text().replace("@DATA@", str(TASKS)))
    return out


def lm_eval_command(base_url: str, tasks: Path, output: Path) -> list[str]:
    """What the README shows, with this server's URL."""
    model_args = ",".join(
        [
            "model=SmolLM2-135M-Instruct",
            f"base_url={base_url}/v1/completions",
            f"tokenizer={default_checkpoint_dir()}",
            "tokenizer_backend=huggingface",
            "max_length=8192",
        ]
    )
    return [
        sys.executable, "-m", "lm_eval", "run",
        "--model", "local-completions",
        "--model_args", model_args,
        "--tasks", "ropeserve_facts_mc,ropeserve_capitals_gen",
        "--include_path", str(tasks),
        "--gen_kwargs", json.dumps({"strategy": STRATEGY}),
        "--output_path", str(output),
        "--log_samples",
    ]  # fmt: skip


def reference_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    whole = tokenizer.encode(context + continuation)
    n_context = len(tokenizer.encode(context))
    with torch.inference_mode():
        logp = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
    return float(sum(logp[i - 1, whole[i]] for i in range(n_context, len(whole))))


def test_lm_eval_local_completions_runs_loglikelihood_and_generation(base_url, http, tmp_path):
    yarn_before = scrape(http, "ropeserve_requests_total", strategy="yarn", status="success") or 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run(
        lm_eval_command(base_url, task_dir(tmp_path), tmp_path / "out"),
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]
    assert results["ropeserve_facts_mc"]["acc,none"] >= 0.5
    assert results["ropeserve_capitals_gen"]["exact_match,first_word"] >= 2 / 3
    # The generation requests carried the strategy (lm-eval spreads gen_kwargs into the body).
    yarn_after = scrape(http, "ropeserve_requests_total", strategy="yarn", status="success")
    assert yarn_after - yarn_before == 3

    tokenizer = AutoTokenizer.from_pretrained(str(default_checkpoint_dir()))
    model = AutoModelForCausalLM.from_pretrained(str(default_checkpoint_dir()), dtype=torch.float32).eval()
    samples = next((tmp_path / "out").rglob("samples_ropeserve_facts_mc_*.jsonl")).read_text().splitlines()
    compared = 0
    for line in samples:
        sample = json.loads(line)
        arguments = [(a["arg_0"], a["arg_1"]) for a in sample["arguments"].values()]
        for (context, continuation), resp in zip(arguments, sample["resps"], strict=True):
            got = float(resp[0][0])
            expected = reference_loglikelihood(model, tokenizer, context, continuation)
            assert abs(got - expected) < 5e-3, (context, continuation, got, expected)
            compared += 1
    assert compared == 16  # 4 questions x 4 choices
