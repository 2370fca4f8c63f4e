"""vLLM's GPU worker, the base of the GPU engine's `worker_cls` (server/engines/multi_rope/gpu_worker.py).

A subclass overrides `init_device`, after which vLLM's V1 worker holds its freshly built runner in
`model_runner` (vLLM 0.32 builds it there, in `_init_workspace_and_model_runner`). Written against
vLLM 0.32's source; never run (see this package's docstring).
"""

from __future__ import annotations

from vllm.v1.worker.gpu_worker import Worker as VllmGpuWorker

__all__ = ["VllmGpuWorker"]
