"""One vLLM engine, every RoPE configuration: the engine-core side (workers, runner, slot table).

The workers and the runner run inside vLLM's engine-core processes (through `worker_cls`). The API
process decides slots in server/engines/rope_slots.py and uses only `table.check_rope_parameters`
from here: a configuration vLLM cannot build a table from is refused before it reaches the engine.
"""

WORKER_CLASSES = {
    "cpu": "server.engines.multi_rope.cpu_worker.MultiRopeCPUWorker",
    "gpu": "server.engines.multi_rope.gpu_worker.MultiRopeGPUWorker",
}

# Key of the engine's settings in `vllm_config.additional_config` (runner.py reads them).
CONFIG_KEY = "ropeserve"
