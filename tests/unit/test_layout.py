"""The rooms of README "Layout" and what each may import, checked on the source (every import,
including those inside functions)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROJECT = ("server", "strategies", "clients", "tests")


def imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def files(room: str) -> list[Path]:
    return sorted((ROOT / room).rglob("*.py"))


def under(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def offending(room: str, allowed: tuple[str, ...], banned: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """Imports of project modules outside `allowed`, and of anything under `banned`."""
    out: dict[str, list[str]] = {}
    for path in files(room):
        bad = [m for m in imports(path) if (under(m, *PROJECT) and not under(m, *allowed)) or under(m, *banned)]
        if bad:
            out[str(path.relative_to(ROOT))] = sorted(bad)
    return out


def test_engines_know_nothing_of_strategies_or_http() -> None:
    allowed = ("server.engines", "server.plan", "server.attention")
    assert offending("server/engines", allowed=allowed, banned=("fastapi", "starlette")) == {}


def runtime_imports(path: Path) -> set[str]:
    """`imports`, less those only a type checker reads (under `if TYPE_CHECKING:`)."""
    tree = ast.parse(path.read_text())
    typing_only = [n for n in ast.walk(tree) if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING"]
    for node in typing_only:
        node.body = []
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_the_plan_types_depend_on_nothing() -> None:
    """Strategies, engines, the server and the Python client all read them; at run time they
    need nothing but the standard library (the engine side's tensors are types only)."""
    third_party = {
        m for m in runtime_imports(ROOT / "server" / "plan.py") if m.split(".")[0] not in sys.stdlib_module_names
    }
    assert third_party == set()


def test_attention_schemes_are_plain_torch_over_the_plan_types() -> None:
    assert offending("server/attention", allowed=("server.attention", "server.plan"), banned=("vllm",)) == {}


# The engine API: base.py and the modules it re-exports (the service imports it through base.py).
ENGINE_API = (
    "server.engines.base",
    "server.engines.rows",
    "server.engines.engine_stats",
    "server.engines.output_constraint",
    "server.plan",
)


@pytest.mark.parametrize("module", ENGINE_API)
def test_engine_api_depends_on_nothing_of_the_project(module: str) -> None:
    path = ROOT / (module.replace(".", "/") + ".py")
    assert [m for m in imports(path) if under(m, *PROJECT) and m not in ENGINE_API] == []


def test_the_vllm_adapter_depends_on_nothing_else_of_the_project() -> None:
    # vLLM's private names live there alone (tests/unit/test_vllm_adapter.py); the rest of the project uses it.
    assert offending("server/engines/vllm_adapter", allowed=("server.engines.vllm_adapter",)) == {}


def test_strategies_see_only_the_engine_api_and_vllm_only_inside_the_engine() -> None:
    allowed = ("strategies", "server.engines.base", "server.plan", "server.attention")
    assert offending("strategies", allowed=allowed, banned=("fastapi",)) == {}
    with_vllm = {str(p.relative_to(ROOT)) for p in files("strategies") if any(under(m, "vllm") for m in imports(p))}
    # The NBCE logits processor runs in vLLM's engine core; no other strategy code touches vLLM.
    assert with_vllm == {"strategies/nbce/processor.py"}


def test_strategies_plan_and_the_service_runs() -> None:
    """No strategy drives the engine: rows decoded in lockstep are run by the service
    (server/service/lockstep.py), whatever strategy planned them."""
    driving = re.compile(r"\.(generate|generate_group|abort)\(")
    assert {str(p.relative_to(ROOT)) for p in files("strategies") if driving.search(p.read_text())} == set()
    assert driving.search((ROOT / "server" / "service" / "lockstep.py").read_text())  # the check reads real calls


def engine_internals(module: str) -> bool:
    """Any engine module but the engine API (server/engines/base.py, the only one the service and HTTP read)."""
    return under(module, "server.engines") and module != "server.engines.base"


def test_the_http_room_knows_no_strategy_engine_or_vllm() -> None:
    """Routes parse, bound and answer; the service plans and runs."""
    bad = {
        str(path.relative_to(ROOT)): sorted(
            m for m in imports(path) if under(m, "strategies", "vllm", "torch") or engine_internals(m)
        )
        for path in files("server/http")
    }
    assert {path: found for path, found in bad.items() if found} == {}


def test_the_service_room_knows_no_http_or_vllm() -> None:
    allowed = (
        "server.service",
        "server.ops",
        "server.plan",
        "server.settings",
        "server.structured",
        "server.engines.base",
    )
    allowed += ("strategies.base", "strategies.registry")
    assert offending("server/service", allowed=allowed, banned=("fastapi", "starlette", "vllm", "torch")) == {}


def test_the_ops_room_serves_every_room_and_imports_none_of_the_pipeline() -> None:
    # The service records into metrics and is watched by the watchdog; so ops never imports it back.
    allowed = ("server.ops", "server.engines.base")
    assert offending("server/ops", allowed=allowed, banned=("fastapi", "vllm")) == {}


def test_clients_speak_http_and_the_contract_schemas() -> None:
    assert offending("clients", allowed=("clients", "server"), banned=("strategies", "server.engines")) == {}


def test_settings_are_read_by_every_room_and_import_none() -> None:
    # The defaults other rooms start from live in settings.py, so no room is imported back by it.
    assert [m for m in imports(ROOT / "server" / "settings.py") if under(m, *PROJECT)] == []


def test_the_python_client_loads_neither_strategies_nor_engines() -> None:
    """Transitively, at run time: what `import clients.client` loads in a fresh interpreter (the
    contract's schemas and the plan types, never a strategy or an engine module)."""
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, clients.client; print(' '.join(sorted(sys.modules)))"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert "server.schemas" in loaded  # the check reads what the client really imports
    assert [m for m in loaded if under(m, "strategies", "server.engines", "vllm", "torch")] == []
