"""Builds the serving stack from settings: model, tokenizer, strategies, vLLM engine pool."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from server.engines.pool import EnginePool
from server.engines.vllm_engine import VllmEngine, VllmEngineConfig, is_cpu_build, read_model_facts
from server.metrics import Metrics
from server.nbce_runner import run_nbce
from server.model_store import DEFAULT_MODEL_NAME, resolve_model
from server.service import GenerationService
from server.settings import Settings
from strategies.base import ModelFacts, RopeConfig, StrategyRequest
from strategies.registry import StrategyRegistry, default_registry

NBCE_LOGITS_PROCESSOR = "server.engines.nbce_processor:NbceLogitsProcessor"


def engine_dtype(settings: Settings) -> str:
    """`auto` on a CPU without AVX-512 bf16 means float32: vLLM falls back to torch's bf16 matmul
    there, measured at 0.5 GFLOPS against 41 GFLOPS in float32 on this project's CI machine."""
    if settings.dtype != "auto" or not is_cpu_build():
        return settings.dtype
    import torch

    return "auto" if torch.cpu._is_avx512_bf16_supported() else "float32"


def engine_config(settings: Settings, model_path: str) -> VllmEngineConfig:
    cpu = is_cpu_build()
    return VllmEngineConfig(
        model=model_path,
        dtype=engine_dtype(settings),
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        enforce_eager=cpu if settings.enforce_eager is None else settings.enforce_eager,
        kv_cache_gib=settings.kv_cache_gib,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        served_model_name=settings.served_model_name,
        # NBCE combines its rows inside the engine (server/nbce_runner.py).
        logits_processors=(NBCE_LOGITS_PROCESSOR,),
    )


# Resident memory of one CPU engine beyond its KV cache (weights, runtime, cos/sin table), GiB;
# measured on the bundled model, see README "Strategies" (engine cost).
ENGINE_OVERHEAD_GIB = 1.5


def prestart_configs(specs: list[Any], registry: StrategyRegistry, model: ModelFacts) -> tuple[RopeConfig, ...]:
    """The RoPE configurations of the strategies named in `settings.prestart`."""
    configs: list[RopeConfig] = []
    for spec in specs:
        strategy = registry.resolve(spec, "native")
        rope_config = getattr(strategy, "rope_config", None)
        if rope_config is not None:  # RoPE strategies: their largest configuration
            configs.append(rope_config(model))
        else:
            configs.append(strategy.plan(StrategyRequest(inputs=""), model, lambda _text: []).rope)
    return tuple(dict.fromkeys(configs))


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


def measured_kv_capacity(pool: EnginePool) -> int | None:
    """Tokens the KV cache of a started engine holds (vLLM's block count x block size)."""
    for engine in pool.engines():
        cache = getattr(getattr(getattr(engine, "_llm", None), "vllm_config", None), "cache_config", None)
        blocks, size = getattr(cache, "num_gpu_blocks", None), getattr(cache, "block_size", None)
        if blocks and size:
            return int(blocks) * int(size)
    return None


async def build_vllm_service(settings: Settings) -> GenerationService:
    from transformers import AutoTokenizer

    model_path = await asyncio.to_thread(resolve_model, settings.model)
    model = read_model_facts(model_path)
    name = settings.served_model_name or (DEFAULT_MODEL_NAME if settings.model is None else settings.model)
    model = dataclasses.replace(model, model_id=name)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    config = engine_config(settings, model_path)
    metrics = Metrics()
    registry = default_registry()
    model = dataclasses.replace(model, max_context_tokens=estimate_kv_capacity(settings, model_path))
    per_engine_gib = settings.engine_memory_gib or settings.kv_cache_gib + ENGINE_OVERHEAD_GIB
    pool = EnginePool(
        model=model,
        # The metrics room hears vLLM's per-iteration stats through the engine's listener.
        factory=lambda rope: VllmEngine(config, rope, model, stats_listener=metrics.engine_listener),
        max_engines=settings.max_engines,
        prestart=prestart_configs(settings.prestart, registry, model),
        memory_budget_gib=settings.engine_memory_budget_gib,
        engine_cost=lambda rope: per_engine_gib,
        on_change=lambda p: metrics.refresh_engines(p.engines()),
    )
    await pool.start()
    measured = measured_kv_capacity(pool)
    if measured is not None and (model.max_context_tokens is None or measured < model.max_context_tokens):
        pool.model = dataclasses.replace(pool.model, max_context_tokens=measured)
    return GenerationService(
        pool=pool,
        registry=registry,
        tokenizer=tokenizer,
        metrics=metrics,
        default_strategy=settings.default_strategy,
        max_concurrent_requests=settings.max_concurrent_requests,
        runners={"nbce": run_nbce},
        engine_seeds=not is_cpu_build(),
    )
