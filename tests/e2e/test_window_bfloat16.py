"""Window attention and DCA on the default dtype of a CPU with bfloat16 instructions: vLLM's CPU
backend writes the paged cache in another layout there (`amx` packs keys and values for its tiles;
`vec` without AMX), which the kernels read back through the probed layout
(server/engines/scheme_attention/paged.py). The engine runs in bfloat16; the reference
(tests/support/window_reference.py) in float32, so the check is statistical: every row's logprobs
follow its own scheme's reference far more closely than plain attention's, and as closely as the
native row follows the native reference (the bfloat16 floor)."""

from __future__ import annotations

import statistics
from typing import Any

import pytest

from tests.e2e.test_multi_rope_engine import model_path
from tests.e2e.test_window_engine import CHUNK, ENGINE_LEN, reference, scheme_rows
from tests.support import window_reference as ref
from tests.support.engine_tokens import run_engines

pytestmark = [pytest.mark.engine, pytest.mark.long_tier]

NAMES = ["native", "rerope", "self_extend", "dca"]


@pytest.fixture(scope="module")
def served() -> dict[str, Any]:
    from transformers import AutoTokenizer

    rows = scheme_rows(AutoTokenizer.from_pretrained(model_path()), NAMES, seed=61027, step=17)
    engine = {"name": "bf16", "max_model_len": ENGINE_LEN, "max_num_batched_tokens": CHUNK, "runs": [{"rows": rows}]}
    out = run_engines({"model": model_path(), "dtype": "bfloat16", "engines": [engine]})
    return {"rows": {r["id"]: r for r in rows}, "out": out["bf16"]["runs"][0]}


@pytest.fixture(scope="module")
def weights() -> ref.LlamaWeights:
    return ref.LlamaWeights.load(model_path())


def mean_gap(got: dict[str, Any], want: dict[str, Any]) -> float:
    return statistics.fmean(abs(a - b) for a, b in zip(got["logprobs"], want["logprobs"], strict=True))


def test_bfloat16_rows_follow_their_schemes(served: dict[str, Any], weights: ref.LlamaWeights) -> None:
    native = served["out"]["native"]
    floor = mean_gap(native, reference(weights, "native", served["rows"]["native"]["prompt"], native["tokens"]))
    for name in NAMES[1:]:
        got, prompt = served["out"][name], served["rows"][name]["prompt"]
        own = mean_gap(got, reference(weights, name, prompt, got["tokens"]))
        plain = mean_gap(got, reference(weights, "native", prompt, got["tokens"]))
        print(f"{name}: mean logprob gap to its reference {own:.3f}, to plain attention {plain:.3f}, floor {floor:.3f}")
        assert own <= max(3 * floor, 0.05), (name, own, floor)
        assert plain > 3 * own, (name, own, plain)
