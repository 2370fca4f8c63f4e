"""One engine, every RoPE configuration: exact against a plain vLLM engine per configuration.

Real engines in subprocesses, one per core (tests/support/engine_tokens.py), float32:
- `multi`: the one engine (slot table), every strategy's configuration; the rows one at a time,
  then all at once in one continuous batch;
- `fixed-*`: a plain vLLM engine started under each configuration (`hf_overrides`), the reference;
- `preempt`: the one engine with a KV cache of a few blocks, all rows at once (vLLM preempts);
- `slot0`: the negative control, the one engine with every row forced to the native slot.

Prompts are longer than the prefill chunk (max_num_batched_tokens=256), so every row is prefilled
in chunks. Tolerances: a row alone, tokens equal and logprobs within LOGPROB_EXACT (the same kernels
on the same shapes: in practice bitwise); in a mixed batch or after preemption, tokens equal and
logprobs within LOGPROB_MIXED (vLLM is not batch-invariant: other rows change the matmul shapes).

Tiers: the default tier runs four configurations (DEFAULT_TIER: native; yarn, with its attention
factor; llama3, frequency by frequency; dynamic_ntk, a base that follows the length) alone against
their own engines, and the negative control, with a short prompt on the dynamic_ntk row (its
configuration is still the one planned for an 8,300-token request: the base that length gets). The
long tier adds linear and ntk (two more of vLLM's rotary classes in the same slot table), the
full-length dynamic_ntk row, the mixed batch, preemption and the Qwen2 / Mistral checkpoints (one
spec for both tiers when long tests are selected, so no engine runs twice).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from clients.bench_passkey import make_case
from server.plan import ModelFacts, RopeConfig
from strategies.base import StrategyRequest
from strategies.registry import default_registry
from tests.support.engine_tokens import run_engines
from tests.support.planning import plan_for

pytestmark = [pytest.mark.engine, pytest.mark.default_tier]

ROOT = Path(__file__).resolve().parents[2]
LOGPROB_EXACT = 1e-5
LOGPROB_MIXED = 2e-3
NEW_TOKENS = 12
CHUNK = 256
ENGINE_LEN = 9_216  # the one engine's max_model_len (and slot rows) in this test
SHORT = 1_100  # prompt tokens of most rows: > CHUNK, inside the native window
LONG = 8_300  # dynamic_ntk's row: past the native window, so its base follows the length
# The preemption run: 300-token prompts that generate 300 tokens each in a KV cache of 1,152
# tokens (9 blocks of 128 on CPU, one of them vLLM's null block). vLLM admits a row only when its
# whole prompt fits (3 blocks), so two rows start; they grow to 4 blocks each, and the 5th block
# one of them needs is not there: vLLM preempts (measured: 4 preemptions for 5 native rows).
PREEMPT_LEN = 1_024
PREEMPT_PROMPT = 300
PREEMPT_NEW = 300
PREEMPT_KV_TOKENS = 1_152

STRATEGIES: dict[str, Any] = {
    "native": "native",
    "linear": {"name": "linear", "factor": 2},
    "ntk": {"name": "ntk", "factor": 2.7},
    "yarn": {"name": "yarn", "factor": 2.7},
    "llama3": {"name": "llama3", "factor": 4},
    "dynamic_ntk": {"name": "dynamic_ntk", "factor": 4},
}

DEFAULT_TIER = ("native", "yarn", "llama3", "dynamic_ntk")


def model_path() -> str:
    from server.ops.model_store import resolve_model

    return str(resolve_model(None))


def prompt_ids(tokenizer: Any, tokens: int, key: str) -> list[int]:
    case = make_case(tokens + 200, 0.5, key, lambda text: len(tokenizer.encode(text)), varied=True)
    ids = tokenizer.encode(case.context + "\n\n" + case.inputs)
    return ids[-tokens:]  # keep the question at the end


def rope_spec(rope: RopeConfig) -> dict[str, Any] | None:
    return None if rope.is_native else {"parameters": rope.as_dict(), "max_model_len": rope.max_model_len}


def llama_rows(
    engine_len: int,
    names: tuple[str, ...] = tuple(STRATEGIES),
    tokens: int = SHORT,
    new_tokens: int = NEW_TOKENS,
    long_dynamic_row: bool = True,
) -> list[dict[str, Any]]:
    """One row per strategy, each with the RoPE configuration its strategy plans on a server whose
    engine holds `engine_len` tokens. dynamic_ntk's configuration is planned for a LONG request;
    its row is that long only with `long_dynamic_row`."""
    from transformers import AutoTokenizer

    from server.engines.vllm_engine import read_model_facts

    path = model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = read_model_facts(path)
    model = ModelFacts(**{**model.__dict__, "max_context_tokens": engine_len})
    registry = default_registry()
    rows = []
    for i, (name, spec) in enumerate(STRATEGIES.items()):
        if name not in names:
            continue
        length = LONG if name == "dynamic_ntk" and long_dynamic_row else tokens
        ids = prompt_ids(tokenizer, length, f"{41234 + 97 * i + tokens}")
        planned_ids = [0] * LONG if name == "dynamic_ntk" else ids
        plan = plan_for(
            spec, StrategyRequest("", max_new_tokens=new_tokens), model, lambda _t, p=planned_ids: p, registry
        )
        assert name == "native" or not plan.rope.is_native, name
        rows.append({"id": name, "prompt": ids, "rope": rope_spec(plan.rope), "max_new_tokens": new_tokens})
    return rows


def long_tests_selected(request: pytest.FixtureRequest) -> bool:
    return any(item.module is request.module and item.get_closest_marker("long_tier") for item in request.session.items)


@pytest.fixture(scope="module")
def llama(request: pytest.FixtureRequest) -> dict[str, Any]:
    from server.engines.vllm_engine import is_cpu_build

    full = long_tests_selected(request)
    rows = llama_rows(ENGINE_LEN, tuple(STRATEGIES) if full else DEFAULT_TIER, long_dynamic_row=full)
    base = {"max_num_batched_tokens": CHUNK, "max_model_len": ENGINE_LEN}
    multi_runs: list[dict[str, Any]] = [{"rows": rows}] + ([{"concurrent": True, "rows": rows}] if full else [])
    engines: list[dict[str, Any]] = [
        {"name": "multi", **base, "runs": multi_runs},
        {"name": "slot0", **base, "force_rope_slot0": True, "runs": [{"rows": rows}]},
    ]
    by_name: dict[str, dict[str, Any]] = {}
    if full:
        # Short prompts, long generations, planned for an engine of 1,024 tokens (the same RoPE parameters).
        growing = llama_rows(
            PREEMPT_LEN, tuple(n for n in STRATEGIES if n != "dynamic_ntk"), PREEMPT_PROMPT, PREEMPT_NEW
        )
        block = 128 if is_cpu_build() else 16  # vLLM's KV block size on this platform
        engines.append(
            {
                "name": "preempt",
                **base,
                "max_model_len": PREEMPT_LEN,
                "num_kv_blocks": PREEMPT_KV_TOKENS // block,
                "runs": [{"concurrent": True, "rows": growing}],
            }
        )
        by_name = {r["id"]: r for r in growing}
    for row in rows:
        # The preemption run's row too, under this engine's configuration (the same parameters).
        runs = [{"rows": [row]}] + (
            [{"rows": [{**by_name[row["id"]], "rope": row["rope"]}]}] if row["id"] in by_name else []
        )
        engines.append({"name": f"fixed-{row['id']}", **base, "fixed_rope": row["rope"] or "native", "runs": runs})
    return {"rows": rows, "out": run_engines({"model": model_path(), "engines": engines})}


def assert_agree(got: dict[str, Any], want: dict[str, Any], tolerance: float, what: str) -> None:
    assert got["tokens"] == want["tokens"], f"{what}: {got['tokens']} != {want['tokens']}"
    worst = max(abs(a - b) for a, b in zip(got["logprobs"], want["logprobs"], strict=False))
    assert worst <= tolerance, f"{what}: logprobs differ by {worst:.2e} > {tolerance:g}"


def reference(out: dict[str, Any], name: str, run: int = 0) -> dict[str, Any]:
    return out[f"fixed-{name}"]["runs"][run][name]


def test_each_configuration_alone_equals_its_own_engine(llama: dict[str, Any]) -> None:
    out = llama["out"]
    names = [row["id"] for row in llama["rows"]]
    assert set(DEFAULT_TIER) <= set(names)
    for name in names:
        assert_agree(out["multi"]["runs"][0][name], reference(out, name), LOGPROB_EXACT, f"{name} alone")
    # One configuration per scaled strategy was placed in a slot (the native one has slot 0).
    assert out["multi"]["rope_slot_loads"] == len(names) - 1


@pytest.mark.long_tier
def test_a_mixed_batch_agrees_within_tolerance(llama: dict[str, Any]) -> None:
    out = llama["out"]
    for name in STRATEGIES:
        assert_agree(out["multi"]["runs"][1][name], reference(out, name), LOGPROB_MIXED, f"{name} in a mixed batch")


@pytest.mark.long_tier
def test_preemption_under_a_small_kv_cache_keeps_every_configuration(llama: dict[str, Any]) -> None:
    out = llama["out"]["preempt"]
    assert out["preemptions"] > 0, "the KV cache was meant to force preemption"
    for name, got in out["runs"][0].items():
        assert_agree(got, reference(llama["out"], name, run=1), LOGPROB_MIXED, f"{name} with preemption")


def test_negative_control_rows_forced_to_the_native_slot_disagree(llama: dict[str, Any]) -> None:
    """If the slots did nothing, the tests above would fail: every scaled configuration's output
    differs from its reference once the rows are rotated natively."""
    out = llama["out"]
    assert_agree(out["slot0"]["runs"][0]["native"], reference(out, "native"), LOGPROB_EXACT, "native in slot0")
    for name in (row["id"] for row in llama["rows"]):
        if name == "native":
            continue
        with pytest.raises(AssertionError):
            assert_agree(out["slot0"]["runs"][0][name], reference(out, name), LOGPROB_MIXED, name)


# --- other architectures: tiny random checkpoints made here ------------------------------------


def tiny_checkpoint(kind: str, directory: Path) -> Path:
    """A randomly initialised 2-layer Qwen2 or Mistral with the bundled model's tokenizer."""
    import torch
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(model_path())
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        initializer_range=0.3,
        tie_word_embeddings=False,
        torch_dtype="float32",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=None))
    target = directory / kind
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    return target


@pytest.mark.long_tier
@pytest.mark.parametrize("kind", ["qwen2", "mistral"])
def test_other_architectures_match_their_own_engine(kind: str, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    path = tiny_checkpoint(kind, tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = prompt_ids(tokenizer, 700, "27182")
    yarn = {
        "parameters": {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 2.7,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
        },
        "max_model_len": 2048,
    }
    rows = [
        {"id": "native", "prompt": ids, "rope": None, "max_new_tokens": NEW_TOKENS},
        {"id": "yarn", "prompt": ids, "rope": yarn, "max_new_tokens": NEW_TOKENS},
    ]
    base = {"max_num_batched_tokens": CHUNK, "max_model_len": 2048}
    out = run_engines(
        {
            "model": str(path),
            "engines": [
                {"name": "multi", **base, "runs": [{"rows": rows}, {"concurrent": True, "rows": rows}]},
                {"name": "fixed-yarn", **base, "fixed_rope": yarn, "runs": [{"rows": [rows[1]]}]},
            ],
        }
    )
    want = out["fixed-yarn"]["runs"][0]["yarn"]
    assert_agree(out["multi"]["runs"][0]["yarn"], want, LOGPROB_EXACT, f"{kind} yarn alone")
    assert_agree(out["multi"]["runs"][1]["yarn"], want, LOGPROB_MIXED, f"{kind} yarn in a mixed batch")
    # The two configurations really differ on this model (else the comparison proves nothing).
    with pytest.raises(AssertionError):
        assert_agree(out["multi"]["runs"][0]["native"], want, LOGPROB_MIXED, f"{kind} native vs yarn")
