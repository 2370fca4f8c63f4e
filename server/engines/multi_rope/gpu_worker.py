"""vLLM's GPU worker with the multi-RoPE runner (`worker_cls` of a GPU engine; needs the V1 runner)."""

from __future__ import annotations

from vllm.v1.worker.gpu_worker import Worker

from server.engines.multi_rope.runner import use_multi_rope_runner


class MultiRopeGPUWorker(Worker):
    def init_device(self) -> None:
        super().init_device()
        use_multi_rope_runner(self.model_runner)
