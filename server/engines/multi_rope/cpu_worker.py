"""vLLM's CPU worker with the multi-RoPE runner (`worker_cls` of a CPU engine)."""

from __future__ import annotations

# First: vLLM's CPU worker module patches torch and vLLM's helpers for the CPU as it is imported,
# before anything else of vLLM's is (the runner below imports vLLM's rotary layers).
from server.engines.vllm_adapter.cpu_worker import VllmCpuWorker

# isort: split

from server.engines.cpu_ray import pin_rank
from server.engines.multi_rope.runner import use_multi_rope_runner


class MultiRopeCPUWorker(VllmCpuWorker):
    def init_device(self) -> None:
        if self.parallel_config.distributed_executor_backend == "ray":
            pin_rank(self.local_rank)  # vLLM binds the ranks of its mp executor, not Ray's
        super().init_device()
        use_multi_rope_runner(self.model_runner)
