"""vLLM's CPU platform, with a device Ray can schedule ranks on (see cpu_ray.py)."""

from __future__ import annotations

from vllm.platforms.cpu import CpuPlatform


class RayCpuPlatform(CpuPlatform):
    # A logical Ray resource, one per rank: Ray refuses "CPU" as a custom resource name.
    ray_device_key: str = "GPU"
    # Ray would set CUDA_VISIBLE_DEVICES for "GPU" actors; there are no CUDA devices to hide.
    ray_noset_device_env_vars = ["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"]
