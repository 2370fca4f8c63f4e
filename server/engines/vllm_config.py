"""What a vLLM engine is started with: its settings, the model's facts, the platform it runs on."""

from __future__ import annotations

from dataclasses import dataclass

from server.engines.base import Parallelism
from server.plan import ModelFacts, RopeConfig

# Slots of the RoPE table (slot 0: the model's own): configurations that can be in use at once.
DEFAULT_ROPE_SLOTS = 32


@dataclass(frozen=True)
class VllmEngineConfig:
    model: str
    # The longest prompt + generated tokens of any row; also the rows of one RoPE slot.
    max_model_len: int
    dtype: str = "auto"
    max_num_seqs: int = 64
    max_num_batched_tokens: int | None = None
    # Per-step cap of a long prefill while other requests are scheduled (vLLM's; 0: none).
    long_prefill_token_threshold: int = 0
    enforce_eager: bool = True
    kv_cache_gib: int = 2
    gpu_memory_utilization: float = 0.85
    enable_prefix_caching: bool = True
    logits_processors: tuple[str, ...] = ()
    served_model_name: str | None = None
    rope_slots: int = DEFAULT_ROPE_SLOTS
    parallelism: Parallelism = Parallelism()
    # A plain engine under this one configuration instead of the slot table (server/engines/vllm_engine.py).
    fixed_rope: RopeConfig | None = None
    # Tests: a KV cache of this many blocks (forces preemption); None: what the memory gives.
    num_kv_blocks: int | None = None
    # Tests: the negative control of the exactness tests (every row rotated natively).
    force_rope_slot0: bool = False

    @property
    def longest_row(self) -> int:
        """The longest row the engine runs: `max_model_len`, or a fixed configuration's own if shorter."""
        fixed = self.fixed_rope
        if fixed is not None and fixed.max_model_len is not None:
            return min(self.max_model_len, fixed.max_model_len)
        return self.max_model_len

    def describe_rope(self) -> str:
        if self.fixed_rope is not None:
            return f"fixed RoPE {self.fixed_rope.label()}"
        return f"{self.rope_slots} RoPE slots x {self.max_model_len} positions"


def is_cpu_build() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def read_model_facts(model: str) -> ModelFacts:
    """Model facts from the checkpoint's config, without starting an engine."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model)
    rope = getattr(cfg, "rope_parameters", None) or {}
    if not rope:  # older transformers keep rope_theta / rope_scaling as attributes
        rope = {"rope_type": "default", "rope_theta": getattr(cfg, "rope_theta", 10000.0)}
        rope.update(getattr(cfg, "rope_scaling", None) or {})
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    eos = cfg.eos_token_id
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    return ModelFacts(
        model_id=model,
        native_window=int(cfg.max_position_embeddings),
        rope_parameters=dict(rope),
        head_dim=int(head_dim),
        vocab_size=int(cfg.vocab_size),
        eos_token_ids=eos_ids,
    )
