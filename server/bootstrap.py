"""Builds the serving stack from settings: model, tokenizer, strategies, the one vLLM engine."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from pathlib import Path

from server.engines.base import Parallelism
from server.engines.grammar_check import GrammarWorker
from server.engines.vllm_engine import VllmEngine, VllmEngineConfig, is_cpu_build, read_model_facts
from server.engines.vllm_structured import regex_compile_bound_s
from server.ops.head_padding import needs_padding, pad_checkpoint
from server.ops.metrics import Metrics
from server.ops.model_store import DEFAULT_MODEL_NAME, model_cache_dir, resolve_model
from server.plan import ModelFacts
from server.service.generation_service import GenerationService
from server.service.queue_admission import admission_controller, all_listeners, learning_from_steps
from server.settings import Settings
from server.structured.compile_check import ConstraintCheck
from strategies.auto_policy import SHIPPED_POLICY, AutoPolicy, load_policy
from strategies.registry import default_registry
from strategies.rope import MAX_FACTOR

log = logging.getLogger(__name__)

# CPU flags (Linux /proc/cpuinfo) that give bfloat16 matmuls in hardware.
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return not BF16_CPU_FLAGS.isdisjoint(flags)


def engine_dtype(settings: Settings) -> str:
    """`auto` on a CPU without bf16 instructions means float32: vLLM falls back to torch's bf16
    matmul there, measured at 0.5 GFLOPS against 41 GFLOPS in float32 on this project's CI machine."""
    if settings.dtype != "auto" or not is_cpu_build():
        return settings.dtype
    return "auto" if cpu_has_bf16() else "float32"


def engine_config(
    settings: Settings, model_path: str, max_model_len: int, logits_processors: tuple[str, ...] = ()
) -> VllmEngineConfig:
    cpu = is_cpu_build()
    return VllmEngineConfig(
        model=model_path,
        max_model_len=max_model_len,
        rope_slots=settings.rope_slots,
        dtype=engine_dtype(settings),
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        long_prefill_token_threshold=settings.long_prefill_tokens,
        enforce_eager=cpu if settings.enforce_eager is None else settings.enforce_eager,
        kv_cache_gib=settings.kv_cache_gib,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        served_model_name=settings.served_model_name,
        parallelism=parallelism(settings),
        # What the registered strategies run inside the engine (NBCE combines its rows there).
        logits_processors=logits_processors,
    )


def parallelism(settings: Settings) -> Parallelism:
    return Parallelism(
        tensor=settings.tensor_parallel_size,
        pipeline=settings.pipeline_parallel_size,
        data=settings.data_parallel_size,
        backend=settings.distributed_executor_backend,
    )


def checkpoint_for_tensor_parallel(settings: Settings, model_path: str) -> str:
    """`model_path`, or a copy padded with zero attention heads (server/ops/head_padding.py) when the
    tensor-parallel size does not divide the model's head counts (SmolLM2-135M's 9 and 3 by 2)."""
    tp = settings.tensor_parallel_size
    config_file = Path(model_path) / "config.json"
    if tp == 1 or not config_file.is_file() or not needs_padding(json.loads(config_file.read_text()), tp):
        return model_path
    target = model_cache_dir(settings.model_cache) / f"{Path(model_path).name}-heads-for-tp{tp}"
    log.warning(
        "tensor parallel %d does not divide %s's attention heads: serving it padded with zero heads from %s",
        tp,
        model_path,
        target,
    )
    return str(pad_checkpoint(Path(model_path), target, tp))


def estimate_kv_capacity(settings: Settings, model_path: str) -> int | None:
    """Tokens one CPU engine's KV cache holds (kv_cache_gib / bytes per token); None on GPU."""
    if not is_cpu_build():
        return None
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_path)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    # "auto": vLLM runs float32 checkpoints in bfloat16 on CPU (2 bytes per KV element).
    dtype_bytes = 4 if "32" in engine_dtype(settings) else 2
    per_token = 2 * cfg.num_hidden_layers * kv_heads * head_dim * dtype_bytes
    return int(settings.kv_cache_gib * 2**30 / per_token * 0.98)


def auto_policy(settings: Settings, served_model: str) -> AutoPolicy | None:
    """The measured policy `auto` follows: the configured file, else the shipped one when it was
    measured on the served model; None ("none", or no policy for this model): thresholds only."""
    if settings.auto_policy == "none":
        return None
    if settings.auto_policy is not None:
        return load_policy(settings.auto_policy)
    shipped = load_policy(SHIPPED_POLICY) if SHIPPED_POLICY.is_file() else None
    if shipped is None or shipped.model != served_model:
        return None
    return shipped


def engine_max_model_len(settings: Settings, model: ModelFacts, kv_capacity: int | None) -> int:
    """The longest request the engine takes: `max_model_len` if set, else the largest factor x the
    native window, capped by what the KV cache holds (a vLLM engine refuses a longer max_model_len)."""
    if settings.max_model_len is not None:
        return settings.max_model_len
    longest = int(MAX_FACTOR * model.native_window)
    return min(longest, kv_capacity) if kv_capacity else longest


async def build_vllm_service(settings: Settings) -> GenerationService:
    from transformers import AutoTokenizer

    model_path = await asyncio.to_thread(resolve_model, settings.model, settings.model_cache)
    model_path = await asyncio.to_thread(checkpoint_for_tensor_parallel, settings, model_path)
    model = read_model_facts(model_path)
    name = settings.served_model_name or (DEFAULT_MODEL_NAME if settings.model is None else settings.model)
    max_model_len = engine_max_model_len(settings, model, estimate_kv_capacity(settings, model_path))
    model = dataclasses.replace(model, model_id=name, max_context_tokens=max_model_len)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    metrics = Metrics()
    registry = default_registry()
    config = engine_config(settings, model_path, max_model_len, registry.engine_logits_processors())
    admission = admission_controller(settings)
    # The metrics room and admission hear vLLM's per-iteration stats through the engine's listener.
    listener = all_listeners(metrics.engine_listener, learning_from_steps(admission))

    async def start_engine() -> VllmEngine:
        engine = VllmEngine(config, model, stats_listener=listener)
        # Engine start-up blocks for tens of seconds; keep the event loop (health checks) serving.
        await asyncio.to_thread(engine.start)
        return engine

    engine = await start_engine()
    metrics.refresh_engine(engine)
    # Structured output's compile check: its child process starts beside the engine.
    constraint_check = ConstraintCheck(
        GrammarWorker(model_path, model.vocab_size, regex_timeout_s=regex_compile_bound_s())
    )
    constraint_check.start_soon()
    return GenerationService(
        engine=engine,
        registry=registry,
        tokenizer=tokenizer,
        metrics=metrics,
        default_strategy=settings.default_strategy,
        max_concurrent_requests=settings.max_concurrent_requests,
        engine_seeds=not is_cpu_build(),
        request_timeout_s=settings.request_timeout_s,
        engine_factory=start_engine,
        strategy_options={"auto_policy": auto_policy(settings, name)},
        admission=admission,
        constraint_check=constraint_check,
    )
