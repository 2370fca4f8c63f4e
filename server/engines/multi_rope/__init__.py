"""One vLLM engine, every RoPE configuration: the engine-core side (workers, runner, slot table).

Imported only inside vLLM's engine-core processes (through `worker_cls`); the API process decides
slots in server/engines/rope_slots.py and never imports torch-side code from here.
"""

WORKER_CLASSES = {
    "cpu": "server.engines.multi_rope.cpu_worker.MultiRopeCPUWorker",
    "gpu": "server.engines.multi_rope.gpu_worker.MultiRopeGPUWorker",
}

# Key of the engine's settings in `vllm_config.additional_config` (runner.py reads them).
CONFIG_KEY = "ropeserve"
