"""Which platform vLLM's own CPU check picks, for the platform plugin (server/engines/cpu_ray.py).

A platform plugin runs while vLLM resolves its platform, so this module imports nothing of vLLM at
import time, and no platform class at all: on a GPU host the plugin declines without loading
vLLM's CPU platform.
"""

from __future__ import annotations

# The class vLLM's built-in CPU check names when it picks the CPU platform.
CPU_PLATFORM = "vllm.platforms.cpu.CpuPlatform"


def builtin_cpu_platform() -> str | None:
    """The qualified name of vLLM's CPU platform class where vLLM's built-in check
    (`vllm.platforms.cpu_platform_plugin`) would pick it on this host, else None."""
    from vllm.platforms import cpu_platform_plugin

    choice: str | None = cpu_platform_plugin()
    return choice
