"""The `ropeserve.strategies` entry-point path, with a real pip-installed plugin package.

The plugin (tests/plugins/ropeserve_testplugin, its own pyproject) is pip-installed into a
temporary directory that is put on sys.path, so the shared virtual environment stays as it was
(other sessions' servers do not suddenly list a test strategy) while importlib.metadata finds the
installed distribution and its entry point exactly as it would in site-packages.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from strategies.base import ModelFacts, StrategyRequest
from strategies.registry import BUILTIN_STRATEGIES, ENTRY_POINT_GROUP, default_registry

PLUGIN = Path(__file__).parent / "plugins" / "ropeserve_testplugin"
ROOT = Path(__file__).resolve().parents[1]
MODEL = ModelFacts("m", 8192, {"rope_type": "default", "rope_theta": 100000.0}, 64, 49152)


@pytest.fixture(scope="session")
def installed_plugin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    target = tmp_path_factory.mktemp("plugin-site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
         "--no-build-isolation", "--target", str(target), str(PLUGIN)],
        check=True, cwd=ROOT,
    )
    sys.path.insert(0, str(target))
    try:
        yield target
    finally:
        sys.path.remove(str(target))
        sys.modules.pop("ropeserve_testplugin", None)


def test_pip_installed_plugin_is_discovered(installed_plugin: Path) -> None:
    assert any(d.name.startswith("ropeserve_testplugin") for d in installed_plugin.glob("*.dist-info"))
    names = {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}
    assert "shifted_theta" in names
    registry = default_registry()
    assert "shifted_theta" in registry.names()
    strategy = registry.resolve({"name": "shifted_theta", "factor": 2, "theta_multiplier": 8}, "native")
    plan = strategy.plan(StrategyRequest("q", max_new_tokens=16), MODEL, lambda text: [1] * 12000)
    assert plan.rope.as_dict() == {"rope_type": "default", "rope_theta": 800000.0}
    assert plan.max_total_tokens == 16384
    schema = registry.get("shifted_theta").parameters_schema()
    assert "theta_multiplier" in schema["properties"]


def test_builtins_are_registered_with_schemas() -> None:
    registry = default_registry()
    for name in ("native", "linear", "ntk", "dynamic_ntk", "yarn", "llama3"):
        cls = registry.get(name)
        schema = cls.parameters_schema()
        if name != "native":
            factor = schema["properties"]["factor"]
            assert factor["minimum"] == 1.0 and factor["maximum"] == 16.0
    assert len(BUILTIN_STRATEGIES) >= 6


def test_project_declares_builtin_entry_points() -> None:
    import tomllib

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"][ENTRY_POINT_GROUP]
    assert set(declared) >= {"native", "linear", "ntk", "dynamic_ntk", "yarn", "llama3"}
    for name, target in declared.items():
        assert f"{target}" in BUILTIN_STRATEGIES, name
