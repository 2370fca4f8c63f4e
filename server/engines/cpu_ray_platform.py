"""vLLM's CPU platform, with a device Ray can schedule ranks on (see cpu_ray.py)."""

from __future__ import annotations

from server.engines.vllm_adapter.platform import VllmCpuPlatform


class RayCpuPlatform(VllmCpuPlatform):
    # A logical Ray resource, one per rank: Ray refuses "CPU" as a custom resource name.
    ray_device_key: str = "GPU"
    # Ray would set CUDA_VISIBLE_DEVICES for "GPU" actors; there are no CUDA devices to hide.
    ray_noset_device_env_vars = ["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"]
