"""vLLM rotates queries and keys exactly as the transformers reference does, per strategy.

For each strategy's RopeConfig we build vLLM's rotary embedding the way vLLM's Llama model does
(`get_rope(head_dim, max_position=config.max_position_embeddings after our hf_overrides, ...)`)
and transformers' `LlamaRotaryEmbedding` from a LlamaConfig carrying the same rope_parameters,
then compare cos/sin and rotated q/k at positions beyond the native window (8k..32k). No engine.
"""

from __future__ import annotations

import math

import pytest
import torch

from server.engines.vllm_launch import hf_overrides_for
from server.plan import ModelFacts
from strategies.base import PromptTokens, StrategyRequest
from strategies.dynamic_ntk import bucket_length
from strategies.registry import default_registry
from tests.support.planning import plan_context

NATIVE = 8192
HEAD_DIM = 64
MODEL = ModelFacts(
    model_id="SmolLM2-135M-Instruct",
    native_window=NATIVE,
    rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
    head_dim=HEAD_DIM,
    vocab_size=49152,
)

CASES = [
    ("linear", {"factor": 2.0}),
    ("linear", {"factor": 4.0}),
    ("ntk", {"factor": 2.0}),
    ("ntk", {"factor": 4.0}),
    ("yarn", {"factor": 2.0}),
    ("yarn", {"factor": 4.0, "beta_fast": 16, "beta_slow": 2, "attention_factor": 1.2}),
    ("yarn", {"factor": 4.0, "mscale": 1.0, "mscale_all_dim": 0.5}),
    ("llama3", {"factor": 4.0}),
    ("llama3", {"factor": 2.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0}),
    ("dynamic_ntk", {"factor": 4.0}),
]


def plan_for(name: str, params: dict, total_tokens: int):
    strategy = default_registry().resolve({"name": name, **params})
    request = StrategyRequest("x", max_new_tokens=16, tokens=PromptTokens(tuple(range(total_tokens - 16))))
    return strategy, strategy.plan(request, plan_context(MODEL))


def vllm_rope(rope_parameters: dict, max_position: int):
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    # CustomOps read the current vLLM config when built; a default one is what a test needs.
    with set_current_vllm_config(VllmConfig()):
        return get_rope(HEAD_DIM, max_position, True, dict(rope_parameters), torch.float32)


def hf_rope(rope_parameters: dict, max_position: int):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(
        hidden_size=576,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=HEAD_DIM,
        max_position_embeddings=max_position,
        rope_parameters=dict(rope_parameters),
    )
    return LlamaRotaryEmbedding(config)


def positions_beyond_native(limit: int) -> torch.Tensor:
    picks = [NATIVE - 1, NATIVE, NATIVE + 1, 12_000, 16_383, 20_000, 24_576, 32_767, limit - 1]
    return torch.tensor(sorted({p for p in picks if p < limit}), dtype=torch.long)


def hf_cos_sin(rope_parameters: dict, max_position: int, positions: torch.Tensor):
    emb = hf_rope(rope_parameters, max_position)
    x = torch.zeros(1, 1, HEAD_DIM, dtype=torch.float32)
    cos, sin = emb(x, positions[None, :])
    return cos[0].double(), sin[0].double()


def hf_rotate(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    from transformers.models.llama.modeling_llama import rotate_half

    return q * cos[:, None, :] + rotate_half(q) * sin[:, None, :]


@pytest.mark.parametrize(("name", "params"), CASES, ids=[f"{n}-{p}" for n, p in CASES])
def test_vllm_rotation_matches_transformers(name: str, params: dict) -> None:
    total = 32_768 if params.get("factor", 2) >= 4 else 16_384
    strategy, plan = plan_for(name, params, total)
    rope_parameters = plan.rope.as_dict()
    assert plan.rope.max_model_len is not None and plan.rope.max_model_len >= total
    overrides = hf_overrides_for(plan.rope, MODEL)
    assert overrides["rope_parameters"] == rope_parameters
    vllm_max_position = overrides["max_position_embeddings"]

    # The reference config: the same rope_parameters, max_position_embeddings = allowed length.
    ref_parameters = dict(rope_parameters)
    ref_max_position = plan.rope.max_model_len
    if name == "dynamic_ntk":
        # Ours is a plain base per bucket; the reference is transformers' dynamic formula at the
        # bucket length (its `factor` is our alpha, its window the native one).
        bucket = bucket_length(total, strategy.params.bucket_tokens, NATIVE, plan.max_total_tokens)
        assert plan.rope.max_model_len == bucket
        ref_parameters = {"rope_type": "dynamic", "rope_theta": MODEL.rope_theta, "factor": strategy.params.alpha}
        ref_max_position = NATIVE

    rotary = vllm_rope(rope_parameters, vllm_max_position)
    table = rotary.cos_sin_cache.double()
    # The table covers every position the engine allows.
    assert table.shape[0] >= plan.rope.max_model_len
    positions = positions_beyond_native(plan.rope.max_model_len)
    half = table.shape[1] // 2
    v_cos, v_sin = table[positions, :half], table[positions, half:]

    if name == "dynamic_ntk":
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        config = hf_rope(ref_parameters, ref_max_position).config
        inv_freq, scale = ROPE_INIT_FUNCTIONS["dynamic"](config, "cpu", seq_len=bucket)
        # float32 phases, as both libraries compute them (positions ~32k lose ~1e-3 rad in float32).
        freqs = (positions.float()[:, None] * inv_freq.float()[None, :]).double()
        h_cos, h_sin = (freqs.cos() * scale), (freqs.sin() * scale)
        h_cos, h_sin = torch.cat([h_cos, h_cos], -1), torch.cat([h_sin, h_sin], -1)
    else:
        h_cos, h_sin = hf_cos_sin(ref_parameters, ref_max_position, positions)

    # transformers duplicates the half-dim frequencies (neox layout); vLLM stores one half.
    torch.testing.assert_close(v_cos, h_cos[:, :half], atol=2e-4, rtol=0)
    torch.testing.assert_close(v_sin, h_sin[:, :half], atol=2e-4, rtol=0)
    torch.testing.assert_close(h_cos[:, :half], h_cos[:, half:])

    # Rotated queries and keys: vLLM's own forward vs transformers' apply_rotary_pos_emb.
    gen = torch.Generator().manual_seed(0)
    n = len(positions)
    q = torch.randn(n, 9, HEAD_DIM, generator=gen)
    k = torch.randn(n, 3, HEAD_DIM, generator=gen)
    vq, vk = rotary.forward_native(positions, q.reshape(n, -1).clone(), k.reshape(n, -1).clone())
    hq = hf_rotate(q.double(), h_cos, h_sin)
    hk = hf_rotate(k.double(), h_cos, h_sin)
    torch.testing.assert_close(vq.reshape(n, 9, HEAD_DIM).double(), hq, atol=1e-3, rtol=0)
    torch.testing.assert_close(vk.reshape(n, 3, HEAD_DIM).double(), hk, atol=1e-3, rtol=0)


def test_dynamic_ntk_base_follows_the_request_length() -> None:
    configs = {}
    for total in (100, 8192, 8193, 12_000, 12_032, 16_384, 30_000, 32_768):
        _, plan = plan_for("dynamic_ntk", {"factor": 4}, total)
        configs[total] = plan
    assert configs[100].rope.is_native and configs[8192].rope.is_native
    # Rounded up to 256 tokens: the base of (nearly) the request's own length.
    assert configs[8193].rope.max_model_len == 8448
    assert configs[12_000].rope == configs[12_032].rope and configs[12_000].rope.max_model_len == 12_032
    assert configs[30_000].rope.max_model_len == 30_208 and configs[32_768].rope.max_model_len == 32_768
    d = HEAD_DIM
    expected = 100000.0 * (2.0 * 12_032 / NATIVE - 1.0) ** (d / (d - 2))
    assert math.isclose(configs[12_000].rope.as_dict()["rope_theta"], expected, rel_tol=1e-12)
    # The response says which length and base were used.
    assert configs[12_000].resolved["length"] == 12_032
    assert configs[12_000].resolved["rope_theta"] == configs[12_000].rope.as_dict()["rope_theta"]
    assert configs[100].resolved["rope_theta"] == 100000.0

    coarse = {
        t: plan_for("dynamic_ntk", {"factor": 4, "bucket_tokens": 8192}, t)[1].rope for t in (8193, 12_000, 16_384)
    }
    assert len(set(coarse.values())) == 1 and coarse[8193].max_model_len == 16_384


def test_ntk_base_formula() -> None:
    _, plan = plan_for("ntk", {"factor": 4}, 20_000)
    assert math.isclose(plan.rope.as_dict()["rope_theta"], 100000.0 * 4 ** (64 / 62), rel_tol=1e-12)
    assert plan.max_total_tokens == 4 * NATIVE
