"""Which RoPE configurations a vLLM engine refuses, and why, before any row reaches the engine core.

A refusal is the client's 422: parameters the engine core cannot build a table from, or a scheme
the attention backend cannot run, must be caught here rather than crash the engine core.
"""

from __future__ import annotations

from typing import Any

from server.engines.vllm_config import VllmEngineConfig
from server.plan import ModelFacts, RopeConfig

# Table checks remembered (configurations are few; the bound keeps a stream of odd ones in check).
MAX_CHECKED_ROPES = 4096


class RopeRefusal:
    """`refuse(rope)`: why rows under `rope` cannot run on the engine (None: they can)."""

    def __init__(self, config: VllmEngineConfig, model: ModelFacts) -> None:
        self.config = config
        self.model = model
        self._vllm_config: Any = None
        self._checked_ropes: dict[str, str | None] = {}
        self._attention_support: str | None = None  # "" once probed and supported

    def engine_started(self, vllm_config: Any) -> None:
        """The started engine's `VllmConfig`: what the attention probe reads."""
        self._vllm_config = vllm_config
        self._attention_support = None

    def refuse(self, rope: RopeConfig) -> str | None:
        fixed = self.config.fixed_rope
        if fixed is not None:
            return None if rope == fixed else f"this engine runs only its fixed RoPE configuration {fixed.label()}"
        if rope.is_native:
            return None
        if (rope.max_model_len or 0) > self.config.max_model_len:
            return f"{rope.label()} allows {rope.max_model_len} tokens; this engine holds {self.config.max_model_len}"
        if rope.attention is not None and (refusal := self._attention_refusal()) is not None:
            return refusal
        return self._table_refusal(rope) if rope.parameters else None

    def _attention_refusal(self) -> str | None:
        """Why this engine cannot run attention schemes (None: it can): the kernel reads vLLM's
        CPU paged cache (server/engines/scheme_attention/), so only the CPU backend with a key
        layout the probe recognises serves it."""
        if self._attention_support is None:
            self._attention_support = self._probe_attention_support()
        return self._attention_support or None

    def _probe_attention_support(self) -> str:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return "attention schemes (window strategies, DCA, STRING, log-n) run on the CPU engine only (vLLM's CPU attention backend)"
        if self._vllm_config is None:
            return "the engine is not started"
        from server.engines.scheme_attention.paged import probe_layout
        from server.engines.vllm_adapter.cpu_attention import attention_isa

        dtype = self._vllm_config.model_config.dtype
        block_size = int(self._vllm_config.cache_config.block_size)
        isa = attention_isa(dtype, block_size, self.model.head_dim)
        if probe_layout(isa, dtype, self.model.head_dim, block_size) is None:
            return f"scheme attention cannot read this host's KV cache layout (CPU attention ISA {isa})"
        return ""

    def _table_refusal(self, rope: RopeConfig) -> str | None:
        """Build a few rows of `rope`'s table here, as the engine core would: parameters vLLM cannot
        build a table from (or that give inf/NaN) must be refused, not crash the engine core."""
        key = rope.key()
        if key not in self._checked_ropes:
            from server.engines.multi_rope.table import check_rope_parameters

            self._checked_ropes[key] = check_rope_parameters(self.model.head_dim, self.model.rotary_dim, rope.as_dict())
            while len(self._checked_ropes) > MAX_CHECKED_ROPES:
                self._checked_ropes.pop(next(iter(self._checked_ropes)))
        return self._checked_ropes[key]
