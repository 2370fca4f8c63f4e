"""Attention schemes (window strategies, log-n, Dual Chunk Attention, STRING) in the real engine (vLLM CPU, the bundled model,
float32) against the reference written from the papers' code (tests/support/window_reference.py: a
plain-PyTorch Llama with a score matrix per case, recomputed from scratch for every position).

Small windows (64-128) and chunks (c = 110) on 880-token prompts, prefilled in chunks of 256,
so scores inside and beyond the window, across chunk boundaries and in decode steps (keys read back
from the paged cache) are all exercised; each row alone, then all of them in one batch with a
native row.
Tolerances: greedy tokens equal; logprobs within LOGPROB_TOLERANCE of the reference (different
kernels: vLLM's matmuls and attention, the reference's plain ones; the native row shows the floor).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from server.attention.dual_chunk import DualChunk
from server.attention.leaky_rerope import LeakyRerope
from server.attention.logn import LogN
from server.attention.rerope import Rerope
from server.attention.self_extend import SelfExtend
from server.attention.string import String
from server.plan import AttentionScheme
from tests.e2e.test_multi_rope_engine import model_path, prompt_ids
from tests.support import window_reference as ref
from tests.support.engine_tokens import run_engines

pytestmark = [pytest.mark.engine, pytest.mark.default_tier]

NEW_TOKENS = 12
PROMPT = 880  # 8 DCA chunks of 110: decode starts a new chunk
CHUNK = 256
ENGINE_LEN = 4_096
LOGPROB_TOLERANCE = 1e-4  # measured: <= 3e-5 for every row, the native one included
NTK_THETA = 400_000.0

SCHEMES: dict[str, AttentionScheme] = {
    "rerope": Rerope(window=64, logn_window=512),
    "leaky_rerope": LeakyRerope(window=64, leak=4.0),
    "self_extend": SelfExtend(window=128, group=4),
    "ntk_logn": LogN(window=512),
    # c = 110: chunk boundaries fall inside the 256-token prefill chunks, and decode (positions
    # 880-891) starts a new chunk; ChunkLlama's mscale past a trained length of 512.
    "dca": DualChunk(chunk_size=150, local_window=40, trained_length=512),
    # All three bands: exact below 150, shifted to 16.. beyond, clamped at 300 past 434.
    "string": String(shift=150, local_window=16, cap=300),
}


def rope_spec(name: str) -> dict[str, Any] | None:
    if name == "native":
        return None
    parameters = {"rope_type": "default", "rope_theta": NTK_THETA} if name == "ntk_logn" else {}
    return {"parameters": parameters, "max_model_len": ENGINE_LEN, "attention": SCHEMES[name].spec()}


def scheme_rows(tokenizer: Any, names: list[str], seed: int, step: int) -> list[dict[str, Any]]:
    """One engine row per scheme name, each with a PROMPT-token prompt of its own (keys seed + step * i)."""
    return [
        {
            "id": name,
            "prompt": prompt_ids(tokenizer, PROMPT, f"{seed + step * i}"),
            "rope": rope_spec(name),
            "max_new_tokens": NEW_TOKENS,
        }
        for i, name in enumerate(names)
    ]


@pytest.fixture(scope="module")
def served() -> dict[str, Any]:
    from transformers import AutoTokenizer

    rows = scheme_rows(AutoTokenizer.from_pretrained(model_path()), ["native", *SCHEMES], seed=52817, step=13)
    engine = {
        "name": "window",
        "max_model_len": ENGINE_LEN,
        "max_num_batched_tokens": CHUNK,
        "runs": [{"rows": rows}, {"concurrent": True, "rows": rows}],
    }
    return {"rows": {r["id"]: r for r in rows}, "out": run_engines({"model": model_path(), "engines": [engine]})}


@pytest.fixture(scope="module")
def weights() -> ref.LlamaWeights:
    return ref.LlamaWeights.load(model_path())


_references: dict[tuple[str, tuple[int, ...]], dict[str, Any]] = {}


def reference(weights: ref.LlamaWeights, name: str, prompt: list[int], tokens: list[int]) -> dict[str, Any]:
    """The reference's greedy tokens and their logprobs, teacher-forced on the served tokens
    (computed once per scheme and sequence: a row served alone and batched usually agrees)."""
    key = (name, tuple(prompt + tokens))
    if key not in _references:
        _references[key] = _reference(weights, name, prompt, tokens)
    return _references[key]


def _reference(weights: ref.LlamaWeights, name: str, prompt: list[int], tokens: list[int]) -> dict[str, Any]:
    if name == "ntk_logn":
        rope = dict(weights.config.get("rope_parameters") or {})  # type: ignore[call-overload]
        weights = ref.LlamaWeights(
            {**weights.config, "rope_parameters": {**rope, "rope_theta": NTK_THETA}}, weights.tensors
        )
    scheme = ref.Scheme() if name == "native" else ref.Scheme.of(SCHEMES[name])
    # The prompt is read in one pass (its own length), every generated token at its own length.
    scheme = dataclasses.replace(scheme, prompt_length=len(prompt))
    with torch.no_grad():
        logits = ref.logits(weights, prompt + tokens[:-1], scheme)[len(prompt) - 1 :]
    logprobs = torch.log_softmax(logits.double(), -1)
    return {
        "tokens": logits.argmax(-1).tolist(),
        "logprobs": [float(logprobs[i, t]) for i, t in enumerate(tokens)],
    }


@pytest.mark.parametrize("run", [0, 1], ids=["alone", "batched"])
@pytest.mark.parametrize("name", ["native", *SCHEMES])
def test_served_rows_agree_with_the_reference(
    served: dict[str, Any], weights: ref.LlamaWeights, name: str, run: int
) -> None:
    got = served["out"]["window"]["runs"][run][name]
    want = reference(weights, name, served["rows"][name]["prompt"], got["tokens"])
    assert got["tokens"] == want["tokens"], f"{name}: served {got['tokens']} != reference {want['tokens']}"
    worst = max(abs(a - b) for a, b in zip(got["logprobs"], want["logprobs"], strict=True))
    print(f"{name} run {run}: worst logprob difference {worst:.2e}")
    assert worst <= LOGPROB_TOLERANCE, f"{name}: logprobs differ from the reference by {worst:.2e}"


@pytest.mark.parametrize("name", list(SCHEMES))
def test_the_scheme_matters(served: dict[str, Any], weights: ref.LlamaWeights, name: str) -> None:
    """Negative control: without its scheme (plain RoPE attention), the reference disagrees with
    what was served, so the agreement above is the scheme's."""
    got = served["out"]["window"]["runs"][0][name]
    plain = reference(weights, "native", served["rows"][name]["prompt"], got["tokens"])
    worst = max(abs(a - b) for a, b in zip(got["logprobs"], plain["logprobs"], strict=True))
    assert got["tokens"] != plain["tokens"] or worst > 100 * LOGPROB_TOLERANCE, f"{name}: {worst:.2e}"
