"""`ropeserve eval`'s pieces without a server (results, plots, the policy it writes, the texts) and
`auto` following a measured policy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clients.eval import plots
from clients.eval.policy import measured_policy, merged_policy
from clients.eval.results import Curve, EvalResults, Score
from server.plan import ModelFacts
from strategies.auto_policy import SHIPPED_POLICY, AutoPolicy, load_policy
from strategies.base import PlanContext, StrategyError, StrategyRequest
from strategies.registry import default_registry
from tests.support.planning import plan_with

MODEL = ModelFacts("m", 8192, {"rope_type": "default", "rope_theta": 100000.0}, 64, 49152, max_context_tokens=40_000)


def synthetic_results() -> EvalResults:
    specs = [{"name": "native"}, {"name": "dynamic_ntk"}, {"name": "nbce"}]
    results = EvalResults("m", 8192, ["native", "dynamic_ntk", "nbce"], specs, [4000, 16000])
    table = {  # (task, strategy, length): (correct, trials) or None for refused
        ("passkey", "native", 4000): (3, 3), ("passkey", "native", 16000): None,
        ("passkey", "dynamic_ntk", 4000): (3, 3), ("passkey", "dynamic_ntk", 16000): (2, 3),
        ("passkey", "nbce", 4000): (2, 3), ("passkey", "nbce", 16000): (3, 3),
        ("niah", "native", 4000): (3, 3), ("niah", "native", 16000): None,
        ("niah", "dynamic_ntk", 4000): (3, 3), ("niah", "dynamic_ntk", 16000): (1, 3),
        ("niah", "nbce", 4000): (3, 3), ("niah", "nbce", 16000): (3, 3),
    }  # fmt: skip
    for (task, name, length), cell in table.items():
        score = results.score(task, name, length)
        if cell is None:
            score.refused = "422: too long"
        else:
            score.correct, score.trials, score.seconds = cell[0], cell[1], 2.0
    results.perplexity = {
        "native": Curve(bucket=1024, ppl=[20.0, 19.0], tokens=2048),
        "nbce": Curve(bucket=1024, refused="echo: no single prompt"),
    }
    results.perplexity_text = "prideprejudice"
    return results


def test_results_round_trip_and_the_policy_ranks_by_accuracy(tmp_path: Path) -> None:
    results = synthetic_results()
    results.save(tmp_path / "results.json")
    again = EvalResults.load(tmp_path / "results.json")
    assert again == results
    policy = AutoPolicy.model_validate(measured_policy(again, source="test"))
    short, long = policy.bands
    assert short.up_to_tokens == 4000 and [c.label for c in short.ranked] == ["native", "dynamic_ntk", "nbce"]
    assert long.up_to_tokens == 16000 and [c.label for c in long.ranked] == ["nbce", "dynamic_ntk"]  # native refused
    assert long.ranked[0].score == 1.0 and long.ranked[1].tasks == {"passkey": "2/3", "niah": "1/3"}
    assert long.ranked[1].strategy == {"name": "dynamic_ntk", "factor": 2.0}  # the factor that fits 16k
    assert policy.band_for(3000) is short and policy.band_for(9000) is long and policy.band_for(20000) is None


def test_ties_in_accuracy_go_to_the_lower_perplexity_past_the_window() -> None:
    """Two strategies with every trial right: the one that reads the text past the native window with
    the lower perplexity ranks first, whatever order they were evaluated in; a strategy without a
    curve (NBCE has no single prompt) ranks after those with one."""
    specs = [{"name": "rerope"}, {"name": "dca"}, {"name": "nbce"}]
    results = EvalResults("m", 2048, ["rerope", "dca", "nbce"], specs, [4096])
    for name in ("rerope", "dca", "nbce"):
        score = results.score("passkey", name, 4096)
        score.correct, score.trials, score.seconds = 3, 3, 2.0
    # Windows of 1,024 tokens: the first two lie inside the 2,048-token window and are not compared.
    results.perplexity = {
        "rerope": Curve(bucket=1024, ppl=[10.0, 10.0, 21.0, 23.0, 99.0], tokens=5120),
        "dca": Curve(bucket=1024, ppl=[30.0, 30.0, 20.0, 22.0], tokens=4096),
        "nbce": Curve(bucket=1024, refused="echo: no single prompt"),
    }
    (band,) = AutoPolicy.model_validate(measured_policy(results, source="test")).bands
    assert [c.label for c in band.ranked] == ["dca", "rerope", "nbce"]
    assert [c.perplexity_past_window for c in band.ranked] == [21.0, 22.0, None]  # 99.0 lies past 4,096


def test_a_cell_measured_under_another_seed_adds_its_trials(tmp_path: Path) -> None:
    results = synthetic_results()  # passkey dynamic_ntk 16000: 2/3 at 2 s, seed 0
    assert results.has("passkey", "dynamic_ntk", 16000) and not results.has("passkey", "dynamic_ntk", 16000, seed=1)
    results.record("passkey", "dynamic_ntk", 16000, Score(correct=3, trials=3, seconds=4.0, seeds=[1]))
    cell = results.score("passkey", "dynamic_ntk", 16000)
    assert (cell.correct, cell.trials, cell.seconds, cell.seeds) == (5, 6, 3.0, [0, 1])
    assert results.has("passkey", "dynamic_ntk", 16000, seed=1)
    results.save(tmp_path / "results.json")
    assert EvalResults.load(tmp_path / "results.json") == results
    old = json.loads((tmp_path / "results.json").read_text())
    for by_length in old["tasks"]["passkey"].values():
        for cell in by_length.values():
            del cell["seeds"]  # a results.json without seeds: its runs used the default seed, 0
    (tmp_path / "results.json").write_text(json.dumps(old))
    assert EvalResults.load(tmp_path / "results.json").score("passkey", "nbce", 16000).seeds == [0]


def test_plots_and_table_are_written(tmp_path: Path) -> None:
    written = plots.write_all(synthetic_results(), tmp_path)
    names = sorted(p.name for p in written)
    assert names == ["niah.png", "passkey.png", "perplexity.png", "results.md"]
    for png in tmp_path.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    table = (tmp_path / "results.md").read_text()
    assert "| native | 3/3 (2 s) | n/a |" in table and "| nbce | n/a | n/a |" in table


def test_the_austen_texts_load_when_installed() -> None:
    from clients.eval.texts import TextsMissing, austen_books

    try:
        books = austen_books()
    except TextsMissing:
        pytest.skip("r-cran-janeaustenr is not unpacked here (scripts/setup.sh with tests fetches it)")
    assert set(books) >= {"prideprejudice", "emma"}
    assert books["prideprejudice"].lstrip().startswith("PRIDE AND PREJUDICE") and len(books["prideprejudice"]) > 600_000


def policy_with(*bands: tuple[int, list[dict]]) -> AutoPolicy:
    return AutoPolicy.model_validate(
        {
            "model": "m",
            "native_window": 8192,
            "bands": [
                {"up_to_tokens": n, "ranked": [{"label": c["name"], "score": 0.9, "strategy": c} for c in choices]}
                for n, choices in bands
            ],
        }
    )


def auto_plan(policy: AutoPolicy | None, request: StrategyRequest, **params: object):
    """auto's plan with one token per character (so lengths are the texts' lengths)."""
    context = PlanContext(MODEL, default_registry(), {"auto_policy": policy})
    return plan_with(context, {"name": "auto", **params}, request, lambda text: [1] * len(text))


def document(tokens: int) -> str:
    return ("Words. " * (tokens // 7 + 1))[:tokens]


def test_the_reason_names_the_measured_cell_and_its_perplexity() -> None:
    policy = policy_with((20000, [{"name": "dca"}]))
    policy.bands[0].ranked[0].tasks = {"passkey": "5/5", "niah_single_1": "3/3"}
    policy.bands[0].ranked[0].perplexity_past_window = 21.25
    plan = auto_plan(policy, StrategyRequest(document(12_000), (), 8))
    assert plan.resolved["chosen"]["name"] == "dca" and plan.resolved["policy"]["perplexity_past_window"] == 21.25
    assert (
        "measured at 20000 tokens: passkey 5/5, niah_single_1 3/3, perplexity past the window 21.25"
        in (plan.resolved["reason"])
    )


def test_auto_follows_the_policy_band_and_says_why() -> None:
    policy = policy_with((8192, [{"name": "native"}]), (20000, [{"name": "nbce"}, {"name": "yarn", "factor": 2.0}]))
    with_context = StrategyRequest("Q?", (document(12_000),), 8)
    plan = auto_plan(policy, with_context)
    assert plan.resolved["chosen"]["name"] == "nbce"
    assert plan.resolved["policy"]["band_up_to_tokens"] == 20000 and plan.resolved["policy"]["rank"] == 1
    assert "measured band up to 20000" in plan.resolved["reason"]
    # No context: NBCE does not apply; the next measured choice, its factor raised to fit.
    plain = auto_plan(policy, StrategyRequest(document(12_000), (), 8))
    assert plain.resolved["chosen"]["name"] == "yarn" and plain.resolved["chosen"]["factor"] == 2.0
    assert plain.resolved["policy"]["rank"] == 2
    raised = auto_plan(policy, StrategyRequest(document(19_000), (), 8))
    assert raised.resolved["chosen"]["factor"] == 4.0
    # Past the last band, or with use_policy false: the thresholds, without a policy entry.
    beyond = auto_plan(policy, StrategyRequest("Q?", (document(30_000),), 8))
    assert "policy" not in beyond.resolved and beyond.resolved["chosen"]["name"] == "nbce"
    off = auto_plan(policy, with_context, use_policy=False)
    assert "policy" not in off.resolved and off.resolved["chosen"]["name"] == "dynamic_ntk"
    assert "policy" not in auto_plan(None, with_context).resolved


def test_the_shipped_policy_is_valid_and_for_the_bundled_model() -> None:
    policy = load_policy(SHIPPED_POLICY)
    assert policy.model == "SmolLM2-135M-Instruct" and policy.native_window == 8192
    assert policy.bands and all(band.ranked for band in policy.bands)
    registry = default_registry()
    for band in policy.bands:
        for choice in band.ranked:
            registry.resolve(choice.strategy)  # every choice is a valid strategy spec
    assert json.loads(SHIPPED_POLICY.read_text())["source"].startswith("ropeserve eval")


def test_a_resumed_run_keeps_what_was_measured_and_adds_the_rest(tmp_path: Path) -> None:
    """`ropeserve eval --resume`: cells already in results.json (measured or refused) are not run
    again; new strategies and lengths join the table."""
    synthetic_results().save(tmp_path / "results.json")
    resumed = EvalResults.load(tmp_path / "results.json").extended(
        ["dynamic_ntk", "dca"], [{"name": "dynamic_ntk"}, {"name": "dca"}], [16000, 32000]
    )
    assert resumed.strategies == ["native", "dynamic_ntk", "nbce", "dca"] and resumed.lengths == [4000, 16000, 32000]
    assert resumed.has("passkey", "dynamic_ntk", 16000) and resumed.has("passkey", "native", 16000)  # refused
    assert not resumed.has("passkey", "dca", 16000) and not resumed.has("passkey", "dynamic_ntk", 32000)


def test_a_band_measured_on_fewer_tasks_ranks_what_was_measured_there() -> None:
    """A grid that measures only passkey at 64k (for dca and nbce) still gets a 64k band, ranked by
    passkey; at 16k a strategy without the RULER cell the others have is no candidate."""
    results = synthetic_results()
    results.lengths.append(64000)
    results.strategies.append("dca")
    results.specs.append({"name": "dca"})
    for name, (correct, trials) in {"dca": (3, 3), "nbce": (1, 3)}.items():
        cell = results.score("passkey", name, 64000)
        cell.correct, cell.trials, cell.seconds = correct, trials, 9.0
    only_passkey = results.score("passkey", "dca", 16000)
    only_passkey.correct, only_passkey.trials = 5, 5
    policy = measured_policy(results, source="test")
    bands = {band["up_to_tokens"]: band for band in policy["bands"]}
    assert [c["label"] for c in bands[64000]["ranked"]] == ["dca", "nbce"]
    assert bands[64000]["ranked"][0]["tasks"] == {"passkey": "3/3"}
    assert "dca" not in [c["label"] for c in bands[16000]["ranked"]]


def test_grids_measured_apart_join_band_by_band_and_the_later_grid_wins() -> None:
    short_grid = synthetic_results()  # 4k and 16k
    long_grid = EvalResults("m", 8192, ["dca", "nbce"], [{"name": "dca"}, {"name": "nbce"}], [16000, 32000])
    for (name, length), (correct, trials) in {
        ("dca", 16000): (5, 5), ("nbce", 16000): (4, 5), ("dca", 32000): (5, 5), ("nbce", 32000): (2, 5),
    }.items():  # fmt: skip
        cell = long_grid.score("passkey", name, length)
        cell.correct, cell.trials, cell.seconds = correct, trials, 3.0
    policy = AutoPolicy.model_validate(merged_policy([short_grid, long_grid], source="test"))
    assert [b.up_to_tokens for b in policy.bands] == [4000, 16000, 32000]
    assert [c.label for c in policy.bands[0].ranked] == ["native", "dynamic_ntk", "nbce"]  # the short grid's
    assert [c.label for c in policy.bands[1].ranked] == ["dca", "nbce"]  # the long grid replaced it
    assert policy.bands[2].ranked[0].tasks == {"passkey": "5/5"}
    long_grid.record("passkey", "nbce", 32000, Score(correct=5, trials=5, seeds=[1]))  # nbce 7/10
    long_grid.record("passkey", "dca", 32000, Score(correct=5, trials=5, seeds=[1]))  # dca 10/10
    rerope = long_grid.score("passkey", "rerope", 32000)
    rerope.correct, rerope.trials = 5, 5
    long_grid.strategies.insert(0, "rerope")
    long_grid.specs.insert(0, {"name": "rerope"})
    ties = AutoPolicy.model_validate(merged_policy([long_grid], source="test")).bands[-1]
    assert [c.label for c in ties.ranked] == ["dca", "rerope", "nbce"]  # 10/10 before 5/5, listed first or not
    other_model = EvalResults("other", 4096, [], [], [])
    with pytest.raises(ValueError, match="different models"):
        merged_policy([short_grid, other_model], source="test")


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"rope": "no_such"}, "strategy.rope: unknown strategy 'no_such'"),
        ({"rope": "native"}, "strategy.rope: 'native' is not a RoPE scaling"),
        ({"rope": "nbce"}, "strategy.rope: 'nbce' is not a RoPE scaling"),
        ({"rope": "yarn", "use_policy": True}, "strategy.use_policy"),
        ({"scoring": [{"name": "rerope"}, {"name": "nope"}]}, "strategy.scoring[1]: unknown strategy 'nope'"),
        ({"scoring": [{"name": "rerope", "window": -1}]}, "strategy.scoring[0].window"),
        ({"scoring": [{"window": 4096}]}, "strategy.scoring[0].name"),
        ({"scoring": [{"name": "nbce"}]}, "strategy.scoring[0]: 'nbce'"),
    ],
)
def test_auto_checks_rope_and_scoring_on_every_request(params, named) -> None:
    """A short request uses neither `rope` nor `scoring`: they are checked anyway, and the error
    names them, not `strategy`."""
    with pytest.raises(StrategyError) as err:
        auto_plan(None, StrategyRequest("Q?", ("short",), 8), **params)
    assert err.value.message.startswith(named), err.value.message


def test_a_rope_the_request_names_is_not_overridden_by_the_policy() -> None:
    policy = policy_with((20000, [{"name": "yarn", "factor": 2.0}]))
    request = StrategyRequest(document(12_000), (), 8)
    assert auto_plan(policy, request).resolved["chosen"]["name"] == "yarn"
    for params in ({"rope": "llama3"}, {"rope": "llama3", "use_policy": False}):
        chosen = auto_plan(policy, request, **params).resolved
        assert "policy" not in chosen and chosen["chosen"]["name"] == "llama3", chosen
    factored = auto_plan(policy, request, rope_factor=4).resolved
    assert "policy" not in factored and factored["chosen"] == {**factored["chosen"], "name": "dynamic_ntk", "factor": 4}


def test_native_ranks_first_where_a_strategy_beats_it_only_by_the_noise() -> None:
    """In the window, 36/40 against native's 35/40 is a trial's difference (a standard error of
    ~0.05): native, the model's own attention, ranks first; 40/40 against 30/40 is not noise."""
    specs = [{"name": "native"}, {"name": "dca"}]
    for (native, dca), first in {(35, 36): "native", (30, 40): "dca", (36, 35): "native"}.items():
        results = EvalResults("m", 8192, ["native", "dca"], specs, [8000])
        for name, correct in (("native", native), ("dca", dca)):
            cell = results.score("fact_recall", name, 8000)
            cell.correct, cell.trials, cell.seconds = correct, 40, 1.0
        (band,) = measured_policy(results, source="test")["bands"]
        assert band["ranked"][0]["label"] == first, (native, dca)
