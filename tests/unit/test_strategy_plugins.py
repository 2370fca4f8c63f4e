"""The `ropeserve.strategies` entry-point path, with a real pip-installed plugin package.

The plugin (tests/plugins/ropeserve_testplugin, its own pyproject) is pip-installed into a
temporary directory that is put on sys.path, so the shared virtual environment stays as it was
(other sessions' servers do not suddenly list a test strategy) while importlib.metadata finds the
installed distribution and its entry point exactly as it would in site-packages.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from server.plan import ModelFacts
from strategies.base import StrategyRequest
from strategies.registry import BUILTIN_STRATEGIES, ENTRY_POINT_GROUP, StrategyRegistry, default_registry
from strategies.yarn import YarnStrategy
from tests.support.planning import plan_for
from tests.support.plugins import ROOT, install_plugin

MODEL = ModelFacts("m", 8192, {"rope_type": "default", "rope_theta": 100000.0}, 64, 49152)


@pytest.fixture(scope="session")
def installed_plugin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    target = tmp_path_factory.mktemp("plugin-site")
    install_plugin(target)
    sys.path.insert(0, str(target))
    try:
        yield target
    finally:
        sys.path.remove(str(target))
        sys.modules.pop("ropeserve_testplugin", None)


BUILTINS = {
    "native": "strategies.native:NativeStrategy",
    "linear": "strategies.linear:LinearStrategy",
    "ntk": "strategies.ntk:NtkStrategy",
    "dynamic_ntk": "strategies.dynamic_ntk:DynamicNtkStrategy",
    "yarn": "strategies.yarn:YarnStrategy",
    "llama3": "strategies.llama3:Llama3Strategy",
    "rerope": "strategies.rerope:ReropeStrategy",
    "leaky_rerope": "strategies.leaky_rerope:LeakyReropeStrategy",
    "self_extend": "strategies.self_extend:SelfExtendStrategy",
    "dca": "strategies.dca:DcaStrategy",
    "string": "strategies.string:StringStrategy",
    "nbce": "strategies.nbce:NbceStrategy",
    "auto": "strategies.auto:AutoStrategy",
}


def test_pip_installed_plugins_are_discovered(installed_plugin: Path) -> None:
    assert any(d.name.startswith("ropeserve_testplugin") for d in installed_plugin.glob("*.dist-info"))
    names = {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}
    assert {"shifted_theta", "per_document"} <= names
    registry = default_registry()
    assert set(registry.names()) == set(BUILTINS) | {"shifted_theta", "per_document"}
    plan = plan_for(
        {"name": "shifted_theta", "factor": 2, "theta_multiplier": 8},
        StrategyRequest("q", max_new_tokens=16),
        MODEL,
        lambda text: [1] * 12000,
        registry,
    )
    assert plan.rope.as_dict() == {"rope_type": "default", "rope_theta": 800000.0}
    assert plan.max_total_tokens == 16384
    assert "theta_multiplier" in registry.get("shifted_theta").parameters_schema()["properties"]
    # The multi-row plugin plans one row per document and brings its own combiner; its rows are
    # planned through the registry it was given, so they may use another plugin's strategy.
    rows = plan_for(
        {"name": "per_document", "rope": "shifted_theta"},
        StrategyRequest("q", ("a", "b", "c"), 16),
        MODEL,
        lambda text: [len(text)] * 4500,  # rows of 9,000 tokens: past the native window
        registry,
    )
    assert len(rows.rows) == 3 and rows.combiner is not None and rows.combiner.name == "one_after_another"
    assert rows.rope.as_dict()["rope_theta"] == 800000.0


def test_every_builtin_is_registered_once_with_a_schema() -> None:
    registry = StrategyRegistry()
    registry.load_builtins()
    assert set(registry.names()) == set(BUILTINS)
    for name, target in BUILTINS.items():
        module, _, attr = target.partition(":")
        assert registry.get(name) is getattr(importlib.import_module(module), attr), name
    for name in BUILTINS:
        schema = registry.get(name).parameters_schema()
        assert schema["type"] == "object", name
        if name in ("linear", "ntk", "dynamic_ntk", "yarn", "llama3"):
            factor = schema["properties"]["factor"]
            assert factor["minimum"] == 1.0 and factor["maximum"] == 16.0
            assert schema["properties"]["logn"]["default"] is False
        if name in ("rerope", "leaky_rerope", "self_extend"):
            # Optional (null: derived from the model's window): the integer variant holds the bounds.
            window = next(v for v in schema["properties"]["window"]["anyOf"] if v["type"] == "integer")
            assert window["minimum"] == 128 and window["maximum"] == 131072
            assert set(schema["properties"]) >= {"window", "logn"}
    # Processors for the engine: NBCE's, once.
    assert registry.engine_logits_processors() == ("strategies.nbce.processor:NbceLogitsProcessor",)


def test_a_taken_name_is_refused() -> None:
    registry = StrategyRegistry()
    registry.load_builtins()

    class Impostor(YarnStrategy):
        """Another class under the name 'yarn'."""

    with pytest.raises(ValueError, match="already taken"):
        registry.register(Impostor)


def test_entry_points_declared_in_pyproject_are_exactly_the_builtins() -> None:
    import tomllib

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"][ENTRY_POINT_GROUP]
    assert declared == BUILTINS
    assert set(BUILTIN_STRATEGIES) == set(BUILTINS.values())
