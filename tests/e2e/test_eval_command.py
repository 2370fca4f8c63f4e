"""`ropeserve eval` end to end on the real server (a small grid), and `auto` following the
shipped measured policy."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from clients.eval.results import EvalResults
from clients.eval.server_meter import listening_pid
from clients.eval.texts import austen_books
from server.ops.model_store import default_checkpoint_dir
from strategies.auto_policy import SHIPPED_POLICY, load_policy
from tests.conftest import ROOT

pytestmark = [pytest.mark.engine, pytest.mark.default_tier]


def test_ropeserve_eval_writes_results_plots_and_a_policy(base_url, tmp_path):
    out = tmp_path / "eval"
    command = [
        sys.executable, "-m", "clients.cli", "eval", "--url", base_url,
        "--strategies", "native,nbce", "--lengths", "1500", "--tasks", "passkey,niah_single_1",
        "--keys", "2", "--samples", "1", "--perplexity", "3000", "--bucket", "512",
        "--out", str(out), "--write-policy", str(out / "policy.json"),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    results = EvalResults.load(out / "results.json")
    for task, trials in (("passkey", 2), ("niah_single_1", 1)):
        for name in ("native", "nbce"):
            score = results.tasks[task][name]["1500"]
            assert score.refused is None and score.trials == trials, (task, name, score)
    assert results.tasks["passkey"]["native"]["1500"].correct == 2  # the bundled model finds a key at 1.5k
    assert results.perplexity["nbce"].refused  # no single prompt (nor a context) to score
    curve = results.perplexity["native"]
    assert len(curve.ppl) == 5  # 2999 scored tokens in windows of 512
    # The first window's perplexity, from a plain transformers forward pass of the same tokens.
    tokenizer = AutoTokenizer.from_pretrained(str(default_checkpoint_dir()))
    ids = tokenizer.encode(austen_books()["prideprejudice"])[:513]
    model = AutoModelForCausalLM.from_pretrained(str(default_checkpoint_dir()), dtype=torch.float32).eval()
    with torch.inference_mode():
        logp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    expected = math.exp(-sum(float(logp[i - 1, ids[i]]) for i in range(1, 513)) / 512)
    assert abs(curve.ppl[0] - expected) / expected < 0.01, (curve.ppl[0], expected)
    for name in ("passkey.png", "niah_single_1.png", "perplexity.png", "results.md"):
        assert (out / name).stat().st_size > 0, name
    policy = load_policy(out / "policy.json")
    assert policy.model == results.model and [b.up_to_tokens for b in policy.bands] == [1500]
    assert {c.label for c in policy.bands[0].ranked} <= {"native", "nbce"}


def test_auto_follows_the_shipped_policy(http):
    policy = load_policy(SHIPPED_POLICY)
    info = http.get("/info").json()
    assert policy.model == info["model_id"]  # the shipped policy applies to the bundled model
    document = " ".join(f"Line {i}: the river runs past the mill and the bridge." for i in range(600))
    # A dry run plans as /generate does and runs nothing: the pick is what this test checks (the
    # varied-text eval test below checks that a dry run's pick is the one a run makes).
    body = {"inputs": "Where does the river run?", "context": document, "strategy": "auto",
            "parameters": {"max_new_tokens": 8}, "dry_run": True}  # fmt: skip
    reply = http.post("/generate", json=body)
    assert reply.status_code == 200, reply.text
    strategy = reply.json()["strategy"]
    tokens = len(
        AutoTokenizer.from_pretrained(str(default_checkpoint_dir())).encode(document + "\n\n" + body["inputs"])
    )
    band = policy.band_for(tokens + 8)
    assert band is not None and strategy["policy"]["band_up_to_tokens"] == band.up_to_tokens
    first = band.ranked[0]
    assert strategy["chosen"]["name"] == first.strategy["name"] and strategy["policy"]["rank"] == 1
    assert strategy["policy"]["score"] == first.score


def test_ropeserve_eval_runs_the_varied_text_tasks(base_url, tmp_path):
    """The varied-text tasks end to end at 1,000 tokens: fresh documents (their first probes found
    nothing in the prefix cache), per-trial records, the cost, `auto`'s recorded pick, the plots
    and a policy ranked by the named tasks."""
    out = tmp_path / "varied"
    command = [
        sys.executable, "-m", "clients.cli", "eval", "--url", base_url, "--strategies", "native;auto",
        "--lengths", "1000", "--tasks", "fact_recall,continuation,distant_copy", "--probes", "4", "--copies", "4",
        "--perplexity", "0", "--out", str(out), "--write-policy", str(out / "policy.json"),
        "--policy-tasks", "fact_recall,continuation",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    results = EvalResults.load(out / "results.json")
    facts = results.tasks["fact_recall"]["native"]["1000"]
    assert facts.trials == 4 and len(facts.records) == 4
    assert facts.correct >= 3, facts.records  # calibrated: the model finishes restated facts in its window
    for task in ("fact_recall", "continuation"):
        cell = results.tasks[task]["native"]["1000"]
        firsts = [r["first_probe_cache"] for r in cell.records if "first_probe_cache" in r]
        assert firsts and all(f["cache_hits"] == 0 and f["cache_queries"] > 500 for f in firsts), firsts
        assert all(
            0 <= r["score"] <= 1 and 0 < r["distance"] < 1000 and r["strategy"] == "native" for r in cell.records
        )
        assert cell.cost["wall_s"] > 0 and cell.served["dry_run"]["name"] == "native"
        if listening_pid(base_url) is not None:
            assert cell.cost["cpu_s"] > 0
    assert results.tasks["continuation"]["native"]["1000"].baseline is not None
    copies = results.tasks["distant_copy"]["native"]["1000"]
    assert copies.trials == 4 and copies.baseline is not None
    assert copies.accuracy > copies.baseline  # a passage read before is predicted better than unseen text
    picked = results.tasks["fact_recall"]["auto"]["1000"].served
    assert (
        picked["dry_run"]["name"] == "auto" and picked["dry_run"]["chosen"]["name"] == picked["reply"]["chosen"]["name"]
    )
    assert "reason" in picked["dry_run"]
    for name in ("fact_recall.png", "fact_recall_by_distance.png", "distant_copy.png", "results.md"):
        assert (out / name).stat().st_size > 0, name
    assert "**cost**" in (out / "results.md").read_text()
    policy = load_policy(out / "policy.json")
    assert [c.label for c in policy.bands[0].ranked] == ["native"]  # auto is a column, not a choice
    assert set(policy.bands[0].ranked[0].tasks) == {"fact_recall", "continuation"}
    assert policy.bands[0].ranked[0].measured_on.startswith("varied text")
