"""RoPE slots without an engine: the API-side allocator, and the slot table against vLLM's own
per-configuration rotaries (bitwise: table rows and rotated q/k, one configuration per token in a
mixed batch, through vLLM's CPU op and its native forward)."""

from __future__ import annotations

import pytest
import torch

from server.engines.rope_slots import RopeSlots, RopeSlotsFull
from server.engines.vllm_launch import hf_overrides_for
from server.plan import ModelFacts, RopeConfig
from strategies.base import StrategyRequest
from tests.support.planning import plan_for

HEAD_DIM = 64
NATIVE = 8192
MODEL = ModelFacts(
    "m", NATIVE, {"rope_type": "default", "rope_theta": 100000.0}, HEAD_DIM, 49152, max_context_tokens=40_000
)


def rope(theta: float, length: int = 16384) -> RopeConfig:
    return RopeConfig.from_dict({"rope_type": "default", "rope_theta": theta}, length)


# --- allocator -------------------------------------------------------------------------------------


def test_native_is_slot_zero_and_configurations_keep_their_slot() -> None:
    slots = RopeSlots(4)
    assert slots.acquire(RopeConfig.native()) == 0 and slots.in_use() == 0
    a, b = slots.acquire(rope(2e5)), slots.acquire(rope(4e5))
    assert {a, b} == {1, 2}
    assert slots.acquire(rope(2e5)) == a and slots.loads == 2
    spec = slots.slot_spec(rope(2e5), a)
    assert spec is not None and spec["slot"] == a and spec["rows"] == 16384
    assert spec["parameters"] == {"rope_type": "default", "rope_theta": 2e5}
    assert slots.slot_spec(RopeConfig.native(), 0) is None


def test_full_table_refuses_until_a_slot_is_released_then_reuses_the_least_recent() -> None:
    slots = RopeSlots(3)
    a = slots.acquire(rope(2e5))
    b = slots.acquire(rope(4e5))
    with pytest.raises(RopeSlotsFull, match="RoPE slots"):
        slots.acquire(rope(8e5))
    spec_b = slots.slot_spec(rope(4e5), b)
    assert spec_b is not None
    epoch_b = spec_b["epoch"]
    slots.release(b)
    # Released but cached: the same configuration comes back to its slot without a rebuild.
    assert slots.acquire(rope(4e5)) == b and slots.loads == 2
    slots.release(b)
    slots.release(a)
    c = slots.acquire(rope(8e5))
    assert c == b  # b was released first
    spec_c = slots.slot_spec(rope(8e5), c)
    assert spec_c is not None and spec_c["epoch"] != epoch_b  # the worker rebuilds
    assert slots.acquire(rope(2e5)) == a and slots.in_use() == 2 and slots.loads == 3


def test_a_held_slot_is_never_handed_to_another_configuration() -> None:
    slots = RopeSlots(3)
    held = {slots.acquire(rope(2e5)): rope(2e5)}
    for k in range(50):
        config = rope(3e5 + k)
        slot = slots.acquire(config)
        assert slot not in held
        slots.release(slot)


def test_the_engine_refuses_a_row_when_every_slot_is_held_and_frees_it_after() -> None:
    from server.engines.vllm_engine import VllmEngine, VllmEngineConfig

    engine = VllmEngine(VllmEngineConfig(model="unused", max_model_len=16384, rope_slots=2), MODEL)
    held = engine.slots.acquire(rope(2e5))
    # Checked before a response starts (the service's 429), and again when the row is admitted.
    assert not engine.can_admit(rope(4e5)) and engine.can_admit(rope(2e5)) and engine.can_admit(RopeConfig.native())
    with pytest.raises(RopeSlotsFull):
        engine.slots.acquire(rope(4e5))
    assert engine.stats().rope_slots_in_use == 1
    engine.slots.release(held)
    assert engine.stats().rope_slots_in_use == 0
    # Configurations longer than the engine's rows are not served (the service answers 422).
    assert "holds 16384" in (engine.refuse_rope(rope(4e5, length=32768)) or "")
    assert engine.refuse_rope(RopeConfig.native()) is None and engine.refuse_rope(rope(4e5)) is None
    # Parameters vLLM cannot build a table from are refused here, never sent to the engine core.
    broken = RopeConfig.from_dict(
        {
            "rope_type": "yarn",
            "rope_theta": 1e5,
            "factor": 2.0,
            "beta_fast": float("inf"),
            "beta_slow": 1.0,
            "original_max_position_embeddings": 8192,
        },
        16384,
    )
    assert "table" in (engine.refuse_rope(broken) or "")
    half = RopeConfig.from_dict({"rope_type": "default", "rope_theta": 1e5, "partial_rotary_factor": 0.5}, 16384)
    assert "rotate 32 dimensions" in (engine.refuse_rope(half) or "")


# --- the table against vLLM's per-configuration rotaries -----------------------------------------

CASES = [
    ("linear", {"factor": 2.0}),
    ("linear", {"factor": 3.5}),
    ("ntk", {"factor": 2.7}),
    ("yarn", {"factor": 2.7}),
    ("yarn", {"factor": 4.0, "beta_fast": 16, "beta_slow": 2, "attention_factor": 1.2}),
    ("llama3", {"factor": 4.0}),
    ("dynamic_ntk", {"factor": 4.0}),
]
ROWS = 40_000  # slot_rows: the engine's max_model_len here


def plan_rope(name: str, params: dict) -> RopeConfig:
    prompt = list(range(12_000))
    return plan_for({"name": name, **params}, StrategyRequest("x", max_new_tokens=16), MODEL, lambda _t: prompt).rope


def per_config_rotary(config: RopeConfig):
    """The rotary a plain vLLM engine fixed to `config` builds (as vLLM's Llama does)."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    overrides = hf_overrides_for(config, MODEL)
    with set_current_vllm_config(VllmConfig()):
        return get_rope(HEAD_DIM, overrides["max_position_embeddings"], True, config.as_dict(), torch.float32)


def slot_table(configs: list[RopeConfig]):
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    from server.engines.multi_rope.table import SlotTableRotaryEmbedding

    with set_current_vllm_config(VllmConfig()):
        native = get_rope(HEAD_DIM, ROWS, True, MODEL.rope_parameters, torch.float32)
        table = SlotTableRotaryEmbedding(native, len(configs) + 1, ROWS)
        for slot, config in enumerate(configs, start=1):
            table.fill_slot(slot, config.as_dict(), config.max_model_len or NATIVE)
    return native, table


def test_slot_rows_equal_vllm_tables_bitwise_and_a_mixed_batch_rotates_as_each_config() -> None:
    configs = [plan_rope(name, params) for name, params in CASES]
    native, table = slot_table(configs)
    references = [native] + [per_config_rotary(c) for c in configs]
    for slot, (config, reference) in enumerate(zip([RopeConfig.native(), *configs], references, strict=False)):
        rows = min(config.max_model_len or NATIVE, ROWS)
        mine = table.cos_sin_cache[slot * ROWS : slot * ROWS + rows]
        assert torch.equal(mine, reference.cos_sin_cache[:rows]), (slot, config.label())

    # A mixed batch: token i belongs to configuration i % n, at a position up to its allowed length.
    gen = torch.Generator().manual_seed(0)
    n_tokens = 64
    which = torch.arange(n_tokens) % len(references)
    limits = torch.tensor([min(c.max_model_len or NATIVE, ROWS) for c in [RopeConfig.native(), *configs]])
    positions = (torch.rand(n_tokens, generator=gen) * limits[which]).long()
    positions[: len(references)] = limits - 1  # every configuration's last row
    shifted = positions + which * ROWS
    q = torch.randn(n_tokens, 9 * HEAD_DIM, generator=gen)
    k = torch.randn(n_tokens, 3 * HEAD_DIM, generator=gen)
    for forward in ("forward_native", "forward_cpu"):
        got_q, got_k = getattr(table, forward)(shifted, q.clone(), k.clone())
        for c, reference in enumerate(references):
            mask = which == c
            want_q, want_k = getattr(reference, forward)(positions[mask], q[mask].clone(), k[mask].clone())
            assert torch.equal(got_q[mask], want_q) and torch.equal(got_k[mask], want_k), (forward, c)

    # Negative control: native rows in place of a scaled configuration's rotate differently.
    wrong_q, _ = table.forward_native(positions, q.clone(), k.clone())
    assert not torch.equal(wrong_q[which != 0], got_q[which != 0])


def test_a_refilled_slot_holds_only_the_new_configuration() -> None:
    first, second = plan_rope("ntk", {"factor": 2.0}), plan_rope("yarn", {"factor": 3.0})
    from vllm.config import VllmConfig, set_current_vllm_config

    _, table = slot_table([first])
    with set_current_vllm_config(VllmConfig()):
        table.fill_slot(1, second.as_dict(), second.max_model_len or NATIVE)
    rows = second.max_model_len or NATIVE
    assert torch.equal(table.cos_sin_cache[ROWS : ROWS + rows], per_config_rotary(second).cos_sin_cache[:rows])


def test_models_without_one_plain_rotary_are_refused() -> None:
    from torch import nn
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    from server.engines.multi_rope.table import install_slot_table

    with set_current_vllm_config(VllmConfig()):
        a = get_rope(HEAD_DIM, 1024, True, {"rope_type": "default", "rope_theta": 1e4}, torch.float32)
        b = get_rope(HEAD_DIM, 1024, True, {"rope_type": "default", "rope_theta": 1e6}, torch.float32)
        with pytest.raises(ValueError, match="no attention layer"):
            install_slot_table(nn.Sequential(nn.Linear(2, 2)), 4, 1024)
        two = nn.ModuleList([nn.Module(), nn.Module()])
        two[0].rotary_emb, two[1].rotary_emb = a, b
        with pytest.raises(ValueError, match="2 different rotary"):
            install_slot_table(two, 4, 1024)
        one = nn.ModuleList([nn.Module(), nn.Module()])
        one[0].rotary_emb = one[1].rotary_emb = a
        table = install_slot_table(one, 4, 1024)
        assert one[0].rotary_emb is table and one[1].rotary_emb is table
        assert torch.equal(table.cos_sin_cache[:1024], a.cos_sin_cache)
