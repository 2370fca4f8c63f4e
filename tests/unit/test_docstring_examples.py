"""The runnable examples in the docstrings of the plan types, the attention schemes, the
strategies and the tokens they plan from run, and say what they print."""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULES = sorted(
    ".".join(path.relative_to(ROOT).with_suffix("").parts)
    for pattern in (
        "server/plan.py",
        "server/attention/*.py",
        "server/service/prompt_tokens.py",
        "strategies/*.py",
        "strategies/nbce/chunking.py",
    )
    for path in ROOT.glob(pattern)
    if path.name != "__init__.py" or path.parent.name == "attention"
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name.removesuffix(".__init__"))
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
