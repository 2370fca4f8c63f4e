"""Planning of `dca` (Dual Chunk Attention; no engine): ChunkLlama's defaults from the model's
window, the native plan inside one chunk, bounds, and the KV cap."""

from __future__ import annotations

import pytest

from server.attention.dual_chunk import DualChunk
from server.plan import ModelFacts, RopeConfig
from strategies.base import StrategyError, StrategyRequest
from strategies.registry import default_registry
from tests.support.planning import plan_for

MODEL = ModelFacts("m", 8192, {"rope_theta": 1e5}, head_dim=64, vocab_size=100, max_context_tokens=90_000)


def plan(spec: object, prompt_tokens: int, new_tokens: int = 16, model: ModelFacts = MODEL):  # type: ignore[no-untyped-def]
    return plan_for(spec, StrategyRequest("q", max_new_tokens=new_tokens), model, lambda _t: [1] * prompt_tokens)  # type: ignore[arg-type]


@pytest.mark.parametrize(("window", "chunk_size", "local_window"), [(8192, 2048, 256), (4096, 1024, 128)])
def test_defaults_follow_the_models_window(window: int, chunk_size: int, local_window: int) -> None:
    """A chunk size of L0 / 4 and a local window of S / 8 (ChunkLlama's 3 L0 / 4 and L0 / 8 retrieved
    worse on the bundled model)."""
    model = ModelFacts("m", window, {"rope_theta": 1e4}, head_dim=64, vocab_size=100, max_context_tokens=10 * window)
    planned = plan("dca", 5 * window, model=model)
    scheme = DualChunk(chunk_size=chunk_size, local_window=local_window, trained_length=window)
    assert planned.rope == RopeConfig((), 10 * window, scheme)
    assert planned.resolved == {"name": "dca", "chunk_size": chunk_size, "local_window": local_window, "mscale": True}


def test_mscale_is_chunkllamas_and_can_be_turned_off() -> None:
    """ChunkLlama scales logits past the trained length (its `get_mscale`); `mscale: false` does not."""
    on = plan("dca", 20_000).rope.attention
    off = plan({"name": "dca", "mscale": False}, 20_000).rope.attention
    assert isinstance(on, DualChunk) and on.trained_length == 8192
    assert off == DualChunk(chunk_size=2048, local_window=256, trained_length=None)


def test_a_chunk_size_alone_keeps_the_default_ratio() -> None:
    scheme = plan({"name": "dca", "chunk_size": 6144}, 20_000).rope.attention
    assert scheme == DualChunk(chunk_size=6144, local_window=768, trained_length=8192)


def test_a_request_inside_one_chunk_is_planned_native() -> None:
    c = 2048 - 256
    assert plan("dca", c - 16, new_tokens=16).rope == RopeConfig.native()
    assert plan("dca", c - 16, new_tokens=17).rope.attention == DualChunk(
        chunk_size=2048, local_window=256, trained_length=8192
    )


def test_any_length_the_kv_cache_holds_is_allowed() -> None:
    assert plan("dca", 80_000).max_total_tokens == 90_000
    with pytest.raises(StrategyError) as refused:
        plan("dca", 90_000)
    assert refused.value.field == "inputs" and "90000" in refused.value.message


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"name": "dca", "chunk_size": 8193}, "strategy.chunk_size"),
        ({"name": "dca", "chunk_size": 1000, "local_window": 1000}, "strategy"),
        ({"name": "dca", "local_window": 7000}, "strategy.local_window"),
        ({"name": "dca", "chunk_size": 1}, "strategy"),
        ({"name": "dca", "window": 512}, "strategy"),
    ],
)
def test_bad_parameters_are_refused_with_the_field(spec: dict[str, object], field: str) -> None:
    with pytest.raises(StrategyError) as refused:
        plan(spec, 20_000)
    assert refused.value.field == field or refused.value.message.startswith(field), refused.value.message


def test_the_schema_says_how_defaults_follow_the_window() -> None:
    schema = default_registry().get("dca").parameters_schema()
    assert "a quarter of the native window" in schema["properties"]["chunk_size"]["description"]
    assert set(schema["properties"]) == {"chunk_size", "local_window", "mscale"}
