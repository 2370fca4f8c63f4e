"""Every request and response body of the HTTP API (see CONTRACT.md), in one typed module."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

StrategySpec = str | dict[str, Any]

FinishReason = Literal["length", "eos_token", "stop_sequence"]
ErrorType = Literal["validation", "overloaded", "unauthorized", "generation"]

# Bounds that hold whatever the server's settings are; settings tighten max_new_tokens further.
MAX_STOP_SEQUENCES = 16
MAX_SEED = 2**63 - 1


class ErrorResponse(BaseModel):
    error: str
    error_type: ErrorType


class GenerateParameters(BaseModel):
    """TGI's `parameters` object; names and meanings follow TGI."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int | None = Field(default=None, ge=1)
    do_sample: bool = False
    temperature: float | None = Field(default=None, gt=0, le=100)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, gt=0)
    typical_p: float | None = Field(default=None, gt=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0, le=10)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP_SEQUENCES)
    details: bool = False
    decoder_input_details: bool = False
    return_full_text: bool | None = False
    truncate: int | None = Field(default=None, ge=1)
    watermark: bool = False
    best_of: int | None = Field(default=None, ge=1, le=1)
    top_n_tokens: int | None = Field(default=None, ge=0, le=5)
    grammar: Any | None = None
    adapter_id: str | None = None

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, stop: list[str]) -> list[str]:
        if any(not s for s in stop):
            raise ValueError("stop sequences must be non-empty strings")
        return stop

    @field_validator("grammar", "adapter_id", "best_of")
    @classmethod
    def _unsupported(cls, value: Any, info: Any) -> Any:
        if value not in (None, 1):
            raise ValueError(f"{info.field_name} is not supported by ropeserve")
        return value

    @field_validator("watermark")
    @classmethod
    def _no_watermark(cls, value: bool) -> bool:
        if value:
            raise ValueError("watermark is not supported by ropeserve")
        return value


class GenerateRequest(BaseModel):
    """Body of POST /generate, /generate_stream and / (TGI)."""

    model_config = ConfigDict(extra="forbid")

    inputs: str = Field(min_length=1)
    context: str | list[str] | None = None
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    strategy: StrategySpec | None = None
    stream: bool = False

    @field_validator("context")
    @classmethod
    def _documents_not_empty(cls, context: str | list[str] | None) -> str | list[str] | None:
        if isinstance(context, list):
            if not context:
                raise ValueError("context must hold at least one document when given as a list")
            if any(not doc for doc in context):
                raise ValueError("context documents must be non-empty strings")
        return context


class Token(BaseModel):
    id: int
    text: str
    logprob: float | None = None
    special: bool = False


class PrefillToken(BaseModel):
    id: int
    text: str
    logprob: float | None = None


class Details(BaseModel):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None = None
    input_length: int
    prefill: list[PrefillToken] = Field(default_factory=list)
    tokens: list[Token] = Field(default_factory=list)


class StreamDetails(BaseModel):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None = None
    input_length: int


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = None
    strategy: dict[str, Any]


class StreamResponse(BaseModel):
    index: int
    token: Token
    generated_text: str | None = None
    details: StreamDetails | None = None
    top_tokens: list[Token] | None = None
    strategy: dict[str, Any] | None = None


class InfoResponse(BaseModel):
    model_id: str
    model_dtype: str
    native_context_window: int
    max_total_tokens: int
    max_new_tokens_limit: int
    engine: str
    default_strategy: str
    version: str
    # The longest prompt + max_new_tokens any strategy may reach on this server (the engine's
    # max_model_len), RoPE slots for configurations in use at once, and the model's head dim.
    max_context_tokens: int | None = None
    rope_slots: int = 0
    head_dim: int = 0


class HealthResponse(BaseModel):
    status: Literal["ok"]


class StrategyInfo(BaseModel):
    name: str
    description: str
    parameters_schema: dict[str, Any]
    engines: list[str]


class StrategiesResponse(BaseModel):
    default: str
    strategies: list[StrategyInfo]


# --- OpenAI-compatible completions -------------------------------------------------------------


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class CompletionRequest(BaseModel):
    """Body of POST /v1/completions; `strategy` and `context` are ropeserve's extra fields."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | list[str] = Field(min_length=1)
    max_tokens: int | None = Field(default=16, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: float | None = Field(default=None, gt=0, le=10)
    ignore_eos: bool = False
    user: str | None = None
    best_of: int | None = Field(default=None, ge=1, le=1)
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None
    strategy: StrategySpec | None = None
    context: str | list[str] | None = None

    @field_validator("prompt")
    @classmethod
    def _single_prompt(cls, prompt: str | list[str]) -> str | list[str]:
        if isinstance(prompt, list) and (len(prompt) != 1 or not prompt[0]):
            raise ValueError("exactly one non-empty prompt string is supported")
        return prompt

    @field_validator("echo", "suffix", "logit_bias")
    @classmethod
    def _unsupported(cls, value: Any, info: Any) -> Any:
        if value not in (None, False, {}):
            raise ValueError(f"{info.field_name} is not supported by ropeserve")
        return value

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] | None = None
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["length", "stop"] | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    strategy: dict[str, Any] | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ropeserve"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
