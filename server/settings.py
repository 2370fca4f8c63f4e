"""Server settings, read from ROPESERVE_* environment variables; the defaults other rooms start from.

`ROPESERVE_API_KEYS` is one key, keys separated by commas, or a JSON list of strings:

    >>> parse_api_keys("secret"), parse_api_keys("k1, k2"), parse_api_keys('["k,1", "k2"]')
    (['secret'], ['k1', 'k2'], ['k,1', 'k2'])
    >>> parse_api_keys("")
    []
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# Values (and keys) a body may hold: twice the longest token-id prompt the bundled model takes
# (16 x its 8,192-token window), so that such a prompt fits with room to spare.
MAX_JSON_ITEMS = 262_144
# 0 turns admission by queued work off (server/service/admission.py).
DEFAULT_MAX_QUEUE_WAIT_S = 60.0
# A day: a longer bound is no bound (use 0 for off).
MAX_QUEUE_WAIT_S = 86_400.0


API_KEYS_SETTING = "ROPESERVE_API_KEYS"
API_KEYS_FORMAT = "one key, keys separated by commas, or a JSON list of strings"


class ApiKeysError(ValueError):
    """ROPESERVE_API_KEYS cannot be read (the server does not start)."""


def parse_api_keys(value: str) -> list[str]:
    """The keys of the setting's text (see the module's doc); ApiKeysError names the format."""
    text = value.strip()
    if not text:
        return []
    if text.startswith("["):
        try:
            keys = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ApiKeysError(
                f"{API_KEYS_SETTING}: not a valid JSON list ({exc.msg}); it is {API_KEYS_FORMAT}"
            ) from None
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise ApiKeysError(f"{API_KEYS_SETTING}: a JSON list must hold strings only; it is {API_KEYS_FORMAT}")
    else:
        keys = [k.strip() for k in text.split(",")]
    if any(not k.strip() for k in keys):
        raise ApiKeysError(f"{API_KEYS_SETTING}: an empty key (check the commas); it is {API_KEYS_FORMAT}")
    return keys


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
    auto_policy: str | None = Field(
        default=None,
        description="measured policy file for `auto` (ropeserve eval --write-policy); default: the shipped "
        "strategies/auto_policy.json when it was measured on the served model; 'none': thresholds only",
    )
    default_strategy: str = "native"
    presets: str | None = Field(
        default=None,
        description="strategy presets a request selects by its `model` (GET /v1/models): a JSON object "
        '{"<preset id>": <strategy>} (e.g. {"smollm2-32k": {"name": "dca"}}), or the path of a JSON file holding one',
    )
    builtin_presets: bool = Field(
        default=True,
        description="offer the built-in presets `<served>-dca`, `-rerope`, `-self_extend`, `-auto` for the bundled "
        "model (server/http/presets.py)",
    )
    dtype: str = "auto"
    kv_cache_gib: int = Field(default=2, ge=1, description="VLLM_CPU_KVCACHE_SPACE for CPU engines")
    gpu_memory_utilization: float = Field(default=0.85, gt=0, le=1)
    enforce_eager: bool | None = Field(
        default=None, description="skip torch.compile; default: True on CPU, where compiling costs minutes"
    )
    rope_slots: int = Field(
        default=32,
        ge=2,
        le=1024,
        description="slots of the engine's RoPE table: distinct RoPE configurations in use at once, plus the native one",
    )
    max_model_len: int | None = Field(
        default=None,
        ge=16,
        description="longest prompt + max_new_tokens of a request; default: 16 x the native window, capped by the KV cache",
    )
    tensor_parallel_size: int = Field(default=1, ge=1, description="ranks that split every layer (vLLM)")
    pipeline_parallel_size: int = Field(default=1, ge=1, description="stages that split the layers (vLLM)")
    data_parallel_size: int = Field(default=1, ge=1, description="engine replicas inside this server (vLLM)")
    distributed_executor_backend: Literal["mp", "ray"] = Field(
        default="mp", description="how vLLM starts its ranks: local processes, or a Ray cluster (several nodes)"
    )
    drain_timeout_s: float = Field(
        default=30.0,
        ge=0,
        description="after SIGTERM: seconds in-flight requests may take to finish while new ones get 503",
    )
    max_num_seqs: int = Field(default=64, ge=1)
    max_num_batched_tokens: int | None = None
    long_prefill_tokens: int = Field(
        default=1024,
        ge=0,
        description="while other requests wait or run, a long prompt is prefilled at most this many tokens a step, "
        "so it cannot hold the whole step budget (vLLM's long_prefill_token_threshold; alone it takes all; 0: off)",
    )
    max_new_tokens_limit: int = Field(default=4096, ge=1)
    max_input_chars: int = Field(default=4_000_000, ge=1)
    max_body_bytes: int = Field(
        default=32 * 2**20, ge=1024, description="request bodies over this many bytes are refused with 413 unread"
    )
    body_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="a request's body must arrive within this many seconds of its headers, else 408 "
        "(a client that stops half-way through its body cannot hold a connection)",
    )
    max_json_items: int = Field(
        default=MAX_JSON_ITEMS,
        ge=1024,
        description="values and keys a JSON body may hold, counted on its bytes before it is parsed (422 past it); "
        "raise it for token-id prompts longer than half of it",
    )
    header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="a request's headers must be complete within this many seconds of the connection opening (or "
        "of the previous response on it), else 408 and the connection closes (a client that dribbles or sends "
        "nothing cannot hold a connection)",
    )
    max_concurrent_requests: int = Field(default=256, ge=1)
    max_queue_wait_s: float = Field(
        default=DEFAULT_MAX_QUEUE_WAIT_S,
        ge=0,
        le=MAX_QUEUE_WAIT_S,
        description="a request whose estimated wait behind the queued work (prompt and new tokens of every row, at "
        "the engine's measured throughput) passes this many seconds is refused with 429 and a Retry-After; 0: off",
    )
    request_timeout_s: float | None = Field(
        default=None, gt=0, description="abort a request this many seconds after it arrived (408); none: no limit"
    )
    # NoDecode: pydantic-settings would read a list as JSON only; parse_api_keys takes the plain forms too.
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=f"keys a request must send as `Authorization: Bearer <key>`: {API_KEYS_FORMAT}; none: no check",
    )
    log_level: str = "info"

    @field_validator("api_keys", mode="before")
    @classmethod
    def _keys_from_text(cls, value: Any) -> Any:
        return parse_api_keys(value) if isinstance(value, str) else value


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
