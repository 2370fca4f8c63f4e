"""Every end-to-end file declares its tier (scripts/test.sh: the default tier, or --long for all),
so that no test silently disappears from both."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

E2E = Path(__file__).resolve().parents[1] / "e2e"
TIERS = {"default_tier", "long_tier"}


def module_marks(path: Path) -> set[str]:
    """The marker names in the module's `pytestmark` (pytest.mark.NAME, alone or in a list)."""
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets):
            return {
                n.attr
                for n in ast.walk(node.value)
                if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Attribute) and n.value.attr == "mark"
            }
    return set()


@pytest.mark.parametrize("path", sorted(E2E.glob("test_*.py")), ids=lambda p: p.name)
def test_each_end_to_end_file_declares_one_tier(path: Path) -> None:
    tiers = module_marks(path) & TIERS
    assert len(tiers) == 1, f"{path.name}: pytestmark must name one of {sorted(TIERS)}, found {sorted(tiers)}"


def test_the_test_command_selects_the_tiers() -> None:
    script = (E2E.parents[1] / "scripts" / "test.sh").read_text()
    assert '-m "not long_tier"' in script and "--long" in script and "--durations=25" in script


def test_test_files_have_distinct_names() -> None:
    """tests/ has no packages: pytest imports each file by its base name, and a second file of the
    same name stops collection of the whole run ("import file mismatch")."""
    names = [p.name for p in E2E.parent.rglob("test_*.py") if "plugins" not in p.parts]
    assert sorted(n for n in set(names) if names.count(n) > 1) == []
