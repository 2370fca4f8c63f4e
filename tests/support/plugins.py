"""The test plugin package (tests/plugins/ropeserve_testplugin), pip-installed where a test says."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = ROOT / "tests" / "plugins" / "ropeserve_testplugin"


def install_plugin(target: Path) -> None:
    """pip-install the plugin into `target` (not the shared environment: other servers must not
    suddenly list test strategies); put `target` on sys.path / PYTHONPATH to use it."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-index",
            "--no-build-isolation",
            "--target",
            str(target),
            str(PLUGIN),
        ],
        check=True,
        cwd=ROOT,
    )
