"""vLLM's CPU worker, the base of the CPU engine's `worker_cls` (server/engines/multi_rope/cpu_worker.py).

A subclass overrides `init_device` (after which vLLM's V1 worker holds its freshly built runner in
`model_runner`) and reads `parallel_config` and `local_rank`, as vLLM's workers set them.

Importing vLLM's CPU worker module patches torch (CUDA events and streams, pinned memory) and
vLLM's helpers for the CPU, and must come before other vLLM modules bind those names: import this
module before anything else of vLLM's.
"""

from __future__ import annotations

from vllm.v1.worker.cpu_worker import CPUWorker as VllmCpuWorker

__all__ = ["VllmCpuWorker"]
