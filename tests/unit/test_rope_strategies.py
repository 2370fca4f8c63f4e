"""RoPE strategies without an engine: parameters, limits, the 422 and its hint."""

from __future__ import annotations

import dataclasses

import pytest

from server.plan import ModelFacts
from strategies.base import StrategyError, StrategyRequest
from strategies.registry import default_registry
from strategies.rope import suggest_rope_strategy
from tests.support.planning import plan_for

MODEL = ModelFacts("m", 8192, {"rope_type": "default", "rope_theta": 100000.0}, 64, 49152)
ROPE = ("linear", "ntk", "dynamic_ntk", "yarn", "llama3")


def plan(spec, prompt_tokens: int, model: ModelFacts = MODEL, max_new: int = 16):
    return plan_for(spec, StrategyRequest("q", max_new_tokens=max_new), model, lambda _t: [7] * prompt_tokens)


@pytest.mark.parametrize("name", ROPE)
@pytest.mark.parametrize("bad", [0.5, 0, 17, "x"])
def test_factor_bounds(name: str, bad) -> None:
    with pytest.raises(StrategyError) as err:
        default_registry().resolve({"name": name, "factor": bad}, "native")
    assert "strategy.factor" in err.value.message


@pytest.mark.parametrize("name", ROPE)
def test_allowed_length_is_factor_times_native(name: str) -> None:
    p = plan({"name": name, "factor": 4}, 30_000)
    assert p.max_total_tokens == 4 * 8192
    assert p.resolved["name"] == name and p.resolved["factor"] == 4
    with pytest.raises(StrategyError) as err:
        plan({"name": name, "factor": 2}, 17_000)
    assert err.value.field == "inputs" and "16384" in err.value.message and "factor" in err.value.message


def test_unknown_parameter_and_knob_checks() -> None:
    for spec in (
        {"name": "yarn", "beta_fast": 1, "beta_slow": 2},
        {"name": "llama3", "low_freq_factor": 4},
        {"name": "ntk", "alpha": 3},
    ):
        with pytest.raises(StrategyError):
            default_registry().resolve(spec, "native")


def test_native_refusal_suggests_fitting_strategies() -> None:
    with pytest.raises(StrategyError) as err:
        plan("native", 12_000)
    msg = err.value.message
    assert "8192" in msg and "'yarn'" in msg and "'ntk'" in msg and "factor >= 2" in msg
    capped = dataclasses.replace(MODEL, max_context_tokens=20_000)
    with pytest.raises(StrategyError) as err:
        plan("native", 30_000, capped)
    assert "20000" in err.value.message


def test_kv_capacity_caps_the_allowed_length() -> None:
    capped = dataclasses.replace(MODEL, max_context_tokens=20_000)
    p = plan({"name": "yarn", "factor": 4}, 19_000, capped)
    assert p.max_total_tokens == 20_000 and p.rope.max_model_len == 20_000
    with pytest.raises(StrategyError):
        plan({"name": "yarn", "factor": 4}, 25_000, capped)


def test_auto_policy_helper() -> None:
    assert suggest_rope_strategy(8000, MODEL) is None
    assert suggest_rope_strategy(12_000, MODEL) == {"name": "dynamic_ntk", "factor": 2.0}
    assert suggest_rope_strategy(20_000, MODEL, "yarn") == {"name": "yarn", "factor": 4.0}
    assert suggest_rope_strategy(50_000, dataclasses.replace(MODEL, max_context_tokens=40_000)) is None


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"name": "yarn", "factor": "2"}, "strategy.factor"),
        ({"name": "yarn", "logn": "yes"}, "strategy.logn"),
        ({"name": "rerope", "logn": 1}, "strategy.logn"),
        ({"name": "rerope", "window": 4096.0}, "strategy.window"),
        ({"name": "nbce", "beta": "0.5"}, "strategy.beta"),
        ({"name": "auto", "use_policy": "false"}, "strategy.use_policy"),
    ],
)
def test_strategy_parameters_are_strict_like_the_body(spec, field) -> None:
    with pytest.raises(StrategyError) as err:
        default_registry().resolve(spec, "native")
    assert err.value.message.startswith(field), err.value.message


def test_an_integer_is_a_float_parameter_as_in_json() -> None:
    assert default_registry().resolve({"name": "yarn", "factor": 2}, "native").params.factor == 2.0


def test_dynamic_ntk_gives_questions_on_the_same_documents_one_base() -> None:
    """The base (and so the prefix-cache salt) of a request with documents does not move with a
    question up to QUESTION_RESERVE_TOKENS long; without documents it follows the exact length."""
    from strategies.base import QUESTION_RESERVE_TOKENS

    def words(n: int) -> str:
        return " ".join(["w"] * n)

    def tokenize(text: str) -> list[int]:
        return [7] * len(text.split())

    def base(question_words: int, documents: tuple[str, ...]) -> float:
        request = StrategyRequest(words(question_words), documents, max_new_tokens=16)
        return plan_for("dynamic_ntk", request, MODEL, tokenize).resolved["rope_theta"]

    document = (words(15_990),)
    assert base(5, document) == base(250, document)  # 15,995 and 16,240 tokens: two buckets apart
    assert base(5, document) != base(QUESTION_RESERVE_TOKENS + 300, document)
    assert base(15_995, ()) != base(16_240, ())  # the same lengths without documents: their own
    assert base(5, (words(100),)) == MODEL.rope_parameters["rope_theta"]  # inside the window: native
