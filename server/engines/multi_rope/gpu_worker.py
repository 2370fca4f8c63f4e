"""vLLM's GPU worker with the multi-RoPE runner (`worker_cls` of a GPU engine; needs the V1 runner)."""

from __future__ import annotations

# First, as in cpu_worker.py: vLLM's worker module before the runner's imports of vLLM's layers.
from server.engines.vllm_adapter.gpu_worker import VllmGpuWorker

# isort: split

from server.engines.multi_rope.runner import use_multi_rope_runner


class MultiRopeGPUWorker(VllmGpuWorker):
    def init_device(self) -> None:
        super().init_device()
        use_multi_rope_runner(self.model_runner)
