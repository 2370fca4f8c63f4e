"""Server settings, read from ROPESERVE_* environment variables."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ROPESERVE_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    model: str | None = Field(
        default=None,
        description="Hugging Face checkpoint directory or hub id; default: the bundled SmolLM2-135M-Instruct",
    )
    model_cache: str | None = Field(default=None, description="where the bundled GGUF is converted to")
    served_model_name: str | None = None
    default_strategy: str = "native"
    dtype: str = "auto"
    kv_cache_gib: int = Field(default=2, ge=1, description="VLLM_CPU_KVCACHE_SPACE for CPU engines")
    gpu_memory_utilization: float = Field(default=0.85, gt=0, le=1)
    enforce_eager: bool | None = Field(
        default=None, description="skip torch.compile; default: True on CPU, where compiling costs minutes"
    )
    max_engines: int = Field(
        default=2, ge=1, description="engines alive at once: one per distinct RoPE configuration (LRU-evicted when idle)"
    )
    engine_memory_budget_gib: float | None = Field(
        default=None, gt=0, description="estimated memory all engines together may use; default: no budget"
    )
    engine_memory_gib: float | None = Field(
        default=None, gt=0,
        description="estimated resident memory of one engine; default: kv_cache_gib + 1.5 GiB (measured on CPU)",
    )
    prestart: list[str | dict[str, Any]] = Field(
        default_factory=lambda: ["native"],
        description='strategies whose RoPE configuration starts with the server and stays (JSON list, e.g. ["native", {"name": "ntk", "factor": 4}])',
    )
    max_num_seqs: int = Field(default=64, ge=1)
    max_num_batched_tokens: int | None = None
    max_new_tokens_limit: int = Field(default=4096, ge=1)
    max_input_chars: int = Field(default=4_000_000, ge=1)
    max_concurrent_requests: int = Field(default=256, ge=1)
    api_keys: list[str] = Field(default_factory=list)
    log_level: str = "info"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
