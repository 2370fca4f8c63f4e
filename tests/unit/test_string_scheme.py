"""STRING as served (server/attention/string.py) against the reference written from HKUNLP/STRING's
code (tests/support/window_reference.py: a score matrix per case, `query_states_1` at i within the
shifted offset, `query_states_2` at i - S + W beyond, the cap clamped as ReRoPE's), and the
strategy's plans. Float64 inputs; the reference's softmax is float32, hence 1e-6."""

from __future__ import annotations

import pytest
import torch

from server.attention import banded
from server.attention.string import PAPER_ATTENTION_FACTOR, String
from server.plan import ModelFacts, RopeConfig
from strategies.base import StrategyError, StrategyRequest
from tests.support import window_reference as ref
from tests.support.planning import plan_for
from tests.support.served_scheme import random_qkv, reference, served

SCHEMES = [
    String(shift=12, local_window=3),  # the paper's two parts
    String(shift=12, local_window=3, cap=20),  # and the clamp past the cap
    String(shift=9, local_window=1, cap=11, attention_factor=1.0),  # narrow bands, no factor
]


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.label())
@pytest.mark.parametrize("steps", [[60], [17, 17, 26], [40, 1, 1, 1, 1, 16], [5] * 12], ids=str)
def test_string_equals_the_reference(scheme: String, steps: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(banded, "QUERY_BLOCK", 4)  # many blocks, so every band edge falls inside one
    n = sum(steps)
    q, k, v = random_qkv(n, seed=n + len(steps))
    expected = reference(q, k, v, ref.Scheme.of(scheme))
    torch.testing.assert_close(served(scheme, q, k, v, steps), expected, rtol=1e-5, atol=1e-6)


def test_the_shift_changes_the_result() -> None:
    """Negative control: past the offset STRING is not plain RoPE attention, even without its
    attention factor (else the test above would pass without the shift)."""
    scheme = String(shift=12, local_window=3, attention_factor=1.0)
    q, k, v = random_qkv(60, seed=3)
    got = served(scheme, q, k, v, [60])
    native = reference(q, k, v, ref.Scheme())
    torch.testing.assert_close(got[:12], native[:12], rtol=1e-5, atol=1e-6)  # inside S: plain attention
    assert (got[12:] - native[12:]).abs().max() > 1e-3


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.label())
def test_relative_positions_and_bound_follow_the_rule(scheme: String) -> None:
    n = 60
    expected = ref.relative_positions(ref.Scheme.of(scheme), n)
    for d in range(n):
        assert scheme.relative(d) == expected[n - 1, n - 1 - d].item()
    assert scheme.max_distance(n) == expected.nan_to_num(-1).max().item()


# --- the strategy -----------------------------------------------------------------------------

MODEL = ModelFacts("m", 8192, {"rope_theta": 1e5}, head_dim=64, vocab_size=100, max_context_tokens=90_000)


def plan(spec: object, prompt_tokens: int, new_tokens: int = 16):  # type: ignore[no-untyped-def]
    return plan_for(spec, StrategyRequest("q", max_new_tokens=new_tokens), MODEL, lambda _t: [1] * prompt_tokens)  # type: ignore[arg-type]


def test_defaults_are_the_papers_and_the_cap_is_strings_own_reach_at_the_window() -> None:
    planned = plan("string", 7_000)
    # S = 0.33 L, W = 128, C = L - 1 - S + W: inside the window the cap is never reached.
    assert planned.rope == RopeConfig((), 90_000, String(shift=2703, local_window=128, cap=5616))
    assert planned.rope.attention is not None and planned.rope.attention.max_distance(8192) == 5616
    assert planned.resolved["attention_factor"] == PAPER_ATTENTION_FACTOR


def test_any_length_the_kv_cache_holds_is_allowed() -> None:
    assert plan("string", 80_000).max_total_tokens == 90_000
    with pytest.raises(StrategyError) as refused:
        plan("string", 90_000)
    assert refused.value.field == "inputs"


def test_inside_the_near_band_without_a_factor_is_native() -> None:
    assert plan({"name": "string", "attention_factor": 1.0}, 2_000).rope == RopeConfig.native()
    assert plan("string", 2_000).rope.attention is not None  # the factor scales every logit


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"name": "string", "shift": 8192}, "strategy.shift"),
        ({"name": "string", "shift": 100, "local_window": 100}, "strategy"),
        ({"name": "string", "cap": 9000}, "strategy.cap"),
        ({"name": "string", "cap": 100}, "strategy.cap"),
        ({"name": "string", "attention_factor": 3.0}, "strategy"),
    ],
)
def test_bad_parameters_are_refused_with_the_field(spec: dict[str, object], field: str) -> None:
    with pytest.raises(StrategyError) as refused:
        plan(spec, 20_000)
    assert refused.value.field == field or refused.value.message.startswith(field), refused.value.message
