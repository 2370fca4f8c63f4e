"""Planning of the window strategies and of log-n on the RoPE scalings (no engine)."""

from __future__ import annotations

import pytest

from server.attention.leaky_rerope import LeakyRerope
from server.attention.logn import LogN
from server.attention.rerope import Rerope
from server.attention.self_extend import SelfExtend
from server.plan import AttentionScheme, ModelFacts, RopeConfig
from server.service.plan_checks import first_served
from strategies.base import StrategyError, StrategyRequest
from tests.support.planning import plan_for
from tests.support.window_reference import Scheme, relative_positions

MODEL = ModelFacts("m", 8192, {"rope_theta": 1e5}, head_dim=64, vocab_size=100, max_context_tokens=90_000)


def plan(spec: object, prompt_tokens: int, new_tokens: int = 16):  # type: ignore[no-untyped-def]
    return plan_for(spec, StrategyRequest("q", max_new_tokens=new_tokens), MODEL, lambda _t: [1] * prompt_tokens)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("spec", "scheme"),
    [
        ("rerope", Rerope(window=4096, logn_window=8192)),
        ("leaky_rerope", LeakyRerope(window=4096, leak=16.0, logn_window=8192)),
        ("self_extend", SelfExtend(window=2048, group=4)),
        ({"name": "rerope", "window": 2048, "logn": False}, Rerope(window=2048)),
    ],
)
def test_defaults_follow_the_models_window(spec: object, scheme: AttentionScheme) -> None:
    """What a client gets without parameters on a model with an 8k window: the windows measured to
    work on the bundled model (half or a quarter of it), not the papers' for a 4k Llama-2."""
    planned = plan(spec, 20_000)
    assert planned.rope == RopeConfig((), planned.max_total_tokens, scheme)
    assert planned.rope.parameters == ()  # the model's own frequencies: slot 0 of the table
    assert planned.resolved["window"] == scheme.window


def test_self_extend_sizes_its_group_to_the_request_as_longlm_does() -> None:
    """G (L0 - W + W/G) must hold the request: G = 4 up to 26,624 tokens with W = 2048, then 8."""
    assert plan("self_extend", 26_600, new_tokens=16).rope.attention == SelfExtend(window=2048, group=4)
    longer = plan("self_extend", 26_700, new_tokens=16)
    assert longer.rope.attention == SelfExtend(window=2048, group=8)
    assert longer.resolved == {"name": "self_extend", "window": 2048, "group": 8, "logn": False}
    assert plan({"name": "self_extend", "group": 4}, 20_000).max_total_tokens == 26_624
    small = ModelFacts("s", 4096, {"rope_theta": 1e4}, head_dim=8, vocab_size=10, max_context_tokens=40_000)
    defaults = plan_for("self_extend", StrategyRequest("q", max_new_tokens=1), small, lambda _t: [1] * 9000)  # type: ignore[arg-type]
    assert defaults.rope.attention == SelfExtend(window=1024, group=4)


@pytest.mark.parametrize("spec", ["rerope", {"name": "self_extend", "window": 2048, "group": 4}, "leaky_rerope"])
def test_a_window_covering_the_request_is_planned_native(spec: object) -> None:
    window = plan(spec, 20_000).rope.attention
    assert window is not None
    assert plan(spec, window.window - 16, new_tokens=16).rope == RopeConfig.native()
    assert plan(spec, window.window - 16, new_tokens=17).rope.attention == window


def test_longest_rows_keep_every_distance_inside_the_native_window() -> None:
    """The allowed length is where the farthest relative position reaches L0 - 1 (the reference's
    relative positions, at small sizes: L0 = 512, the smallest window a request may ask for)."""
    small = ModelFacts("s", 512, {"rope_theta": 1e4}, head_dim=8, vocab_size=10)
    for spec, scheme in [
        ({"name": "self_extend", "window": 128, "group": 4}, Scheme("self_extend", window=128, group=4)),
        ({"name": "leaky_rerope", "window": 128, "leak": 4}, Scheme("leaky_rerope", window=128, k=4.0)),
    ]:
        limit = plan_for(spec, StrategyRequest("q", max_new_tokens=1), small, lambda _t: [1] * 40).max_total_tokens  # type: ignore[arg-type]
        assert float(relative_positions(scheme, limit).nan_to_num(0).max()) <= 511
        assert float(relative_positions(scheme, limit + 1).nan_to_num(0).max()) > 511


def test_rerope_allows_what_the_kv_cache_holds() -> None:
    assert plan("rerope", 20_000).max_total_tokens == 90_000
    with pytest.raises(StrategyError) as refused:
        plan("rerope", 90_000)
    assert refused.value.field == "inputs" and "90000" in refused.value.message


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"name": "rerope", "window": 8192}, "strategy.window"),
        ({"name": "self_extend", "window": 1000, "group": 6}, "strategy"),
        ({"name": "leaky_rerope", "leak": 0.5}, "strategy"),
    ],
)
def test_bad_parameters_are_refused_with_the_field(spec: object, field: str) -> None:
    with pytest.raises(StrategyError) as refused:
        plan(spec, 20_000)
    assert refused.value.field == field or refused.value.message.startswith(field)


@pytest.mark.parametrize("name", ["linear", "ntk", "yarn", "llama3", "dynamic_ntk"])
def test_logn_rides_on_every_rope_scaling_past_the_native_window(name: str) -> None:
    long = plan({"name": name, "factor": 4, "logn": True}, 20_000)
    assert long.rope.attention == LogN(window=8192)
    assert long.resolved["logn"] is True
    without = plan({"name": name, "factor": 4}, 20_000)
    assert without.rope.attention is None and without.rope.parameters == long.rope.parameters
    # Inside the native window s(i) = 1: nothing to scale.
    assert plan({"name": name, "factor": 4, "logn": True}, 4_000).rope.attention is None


def test_nbce_rows_run_under_a_window_strategy_when_longer_than_its_window() -> None:
    """NBCE plans its rope for the longest row: rows past the window get the scheme, not `native`
    (which the short question alone would plan)."""
    request = StrategyRequest("q", documents=("word " * 3000,), max_new_tokens=8)
    tokenize = lambda text: [1] * len(text.split())  # noqa: E731 - one token per word
    spec = {"name": "nbce", "chunk_tokens": 1000, "rope": {"name": "rerope", "window": 512}}
    planned = plan_for(spec, request, MODEL, tokenize)
    assert len(planned.rows) >= 3 and planned.rope.attention == Rerope(window=512, logn_window=8192)
    short = {"name": "nbce", "chunk_tokens": 400, "rope": {"name": "rerope", "window": 512}}
    assert plan_for(short, request, MODEL, tokenize).rope == RopeConfig.native()


def scoring_plan(prompt_tokens: int, reads_prompt: bool = True, refuse: str | None = None, **auto: object):  # type: ignore[no-untyped-def]
    """auto's plan, and of it and its fallbacks the one an engine that refuses attention schemes
    with `refuse` (None: refuses nothing) serves, as the service picks it."""
    request = StrategyRequest("q", max_new_tokens=0, scoring=reads_prompt)
    planned = plan_for({"name": "auto", **auto}, request, MODEL, lambda _t: [1] * prompt_tokens)  # type: ignore[arg-type]
    return first_served(planned, lambda rope: refuse if rope.attention else None)


def test_auto_scores_past_the_window_with_the_lowest_measured_perplexity() -> None:
    """A scoring request (prompt logprobs) past the window gets self_extend W=2048 G=4; past what
    it allows (26,624), rerope w=4096; inside the window, and for generation, auto as before."""
    chosen = scoring_plan(12_000)
    assert chosen.rope.attention == SelfExtend(window=2048, group=4)
    assert "scoring request" in chosen.resolved["reason"]
    assert scoring_plan(30_000).rope.attention == Rerope(window=4096, logn_window=8192)
    assert scoring_plan(8_000).rope == RopeConfig.native()
    generating = scoring_plan(12_000, reads_prompt=False)
    assert generating.rope.attention is None and generating.resolved["chosen"]["name"] == "dynamic_ntk"


def test_auto_scores_like_any_request_where_the_engine_refuses_window_attention() -> None:
    refused = scoring_plan(12_000, refuse="CPU engine only")
    assert refused.rope.attention is None and refused.resolved["chosen"]["name"] == "dynamic_ntk"
    assert scoring_plan(12_000, scoring=[]).rope.attention is None  # the client turned it off
    with pytest.raises(StrategyError) as bad:
        scoring_plan(12_000, scoring=[{"name": "self_extend", "window": 1000, "group": 6}])
    assert "multiple of group" in bad.value.message
