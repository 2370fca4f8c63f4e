"""Every request and response body of the HTTP API (see docs/CONTRACT.md), in one typed module."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator

from server.plan import FinishReason as FinishReason
from server.plan import StrategySpec as StrategySpec
from server.plan import clipped as clipped  # quoted client text, for the HTTP layer's messages
from server.plan import refuse_many_unknown
from server.structured.fields import OpenAIConstraintFields, TgiGrammar

ErrorType = Literal["validation", "overloaded", "unauthorized", "generation"]

# Bounds that hold whatever the server's settings are; settings tighten max_new_tokens further.
MAX_STOP_SEQUENCES = 16
MAX_SEED = 2**63 - 1
# vLLM refuses a temperature above 2 and cannot serialise a top_k past int32.
MAX_TEMPERATURE = 2.0
MAX_TOP_K = 2**31 - 1
MAX_DEADLINE_S = 86_400.0
# `priority` spans a 32-bit integer (vLLM's is unbounded; no client needs more).
MIN_PRIORITY, MAX_PRIORITY = -(2**31), 2**31 - 1
PRIORITY_DESCRIPTION = (
    "scheduling priority, vLLM's meaning: lower runs first among waiting requests (ties by arrival); "
    "omitted: the server's (a short prompt goes ahead of long documents)"
)
# vLLM's default max_logprobs.
MAX_LOGPROBS = 20
# TGI's default max_top_n_tokens.
MAX_TOP_N_TOKENS = 5

DRY_RUN_DESCRIPTION = (
    "ropeserve's extra field: answer what the request would run as (DryRunResponse: the strategy, and "
    "`auto`'s choice and reason; rows, tokens, the allowed length, KV tokens needed, whether it would be "
    "admitted now) without running it"
)

# Every list of a body is bounded in count, and checked against its bound before its items (a
# JSON body's values are bounded as a whole before it is parsed: server/http/json_body.py).
# Documents of a `context` list: NBCE runs at most 64 rows; the plain strategies join them.
MAX_DOCUMENTS = 1024
# Messages of a conversation (OpenAI's own bound), and text parts in all its messages together.
MAX_MESSAGES = 2048
MAX_CONTENT_PARTS = 4096
# Token ids of one prompt: a static cap; the engine's max_model_len refuses before they are decoded.
MAX_TOKEN_IDS = 2**20
# Items of fields refused unless empty (`tools`, `logit_bias`): counted first all the same.
MAX_REFUSED_ITEMS = 128

# Lists stop at their first bad item (pydantic's fail_fast): one error for a list of a million bad
# items, not a million errors, each built in Python and then written into the reply.
Texts = Annotated[list[str], Field(max_length=MAX_DOCUMENTS, fail_fast=True)]
TokenIds = Annotated[list[int], Field(max_length=MAX_TOKEN_IDS, fail_fast=True)]
StopList = Annotated[list[str], Field(max_length=MAX_STOP_SEQUENCES, fail_fast=True)]


def _encodable(value: Any) -> bool:
    """Whether all text in a JSON value is valid Unicode, checked in C: walking a body of millions
    of items in Python (to find where the bad text is) takes seconds."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except (UnicodeEncodeError, TypeError, ValueError):
        return False
    return True


def _unencodable(value: Any, path: str) -> str | None:
    """The path of the first string in `value` that is not valid Unicode (an unpaired surrogate)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            found = _unencodable(key, path) or _unencodable(item, f"{path}.{key}" if path else str(key))
            if found:
                return found
    if isinstance(value, list):
        for i, item in enumerate(value):
            if found := _unencodable(item, f"{path}.{i}"):
                return found
    return None


def documents_not_empty(context: str | list[str] | None) -> str | list[str] | None:
    """A `context` list holds at least one document, none of them empty (every route's rule)."""
    if isinstance(context, list):
        if not context:
            raise ValueError("context must hold at least one document when given as a list")
        if any(not doc for doc in context):
            raise ValueError("context documents must be non-empty strings")
    return context


def count_content_parts(data: Any) -> Any:
    """A conversation's `before` validator: its text parts in all messages together are bounded,
    counted before any message is validated (the messages' own count is their field's bound)."""
    messages = data.get("messages") if isinstance(data, dict) else None
    if isinstance(messages, list) and len(messages) <= MAX_MESSAGES:
        parts = sum(len(m["content"]) for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list))
        if parts > MAX_CONTENT_PARTS:
            raise ValueError(f"messages: {parts} content parts in all messages; the limit is {MAX_CONTENT_PARTS}")
    return data


class RequestBody(BaseModel):
    """Base of request bodies: unknown fields are errors, types strict (no "1" for 1, no 1.0 for
    an integer, no 0 for false), numbers finite, text valid Unicode."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        if _encodable(data):
            return data
        if (path := _unencodable(data, "")) is not None:
            raise ValueError(f"{path or 'body'}: text with an unpaired surrogate (not valid Unicode)")
        return data

    @model_validator(mode="before")
    @classmethod
    def _few_unknown_fields(cls, data: Any) -> Any:
        """Many unknown fields are one error, not one each (pydantic names a few itself)."""
        return refuse_many_unknown(data, cls.model_fields.keys(), "fields")


class ErrorResponse(BaseModel):
    error: str
    error_type: ErrorType


# A streaming route's 200 when the request is a dry run: JSON, not events.
DRY_RUN_JSON: dict[str, Any] = {"application/json": {"schema": {"$ref": "#/components/schemas/DryRunResponse"}}}


class OpenAIErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class OpenAIErrorResponse(BaseModel):
    """OpenAI's and vLLM's error body, for what their clients branch on (a `model` not served: 404)."""

    error: OpenAIErrorInfo


class DryRunResponse(BaseModel):
    """A dry run's answer (`"dry_run": true` on a generation route): what the request would run as."""

    dry_run: Literal[True] = True
    # The OpenAI routes: the `model` asked for (the served model or a preset), as a reply would echo it.
    model: str | None = None
    # As the reply's `strategy` would be: for `auto`, `chosen` and the `reason` it was chosen for.
    strategy: dict[str, Any]
    rows: int
    prompt_tokens: int
    max_new_tokens: int
    # The longest prompt + max_new_tokens the chosen strategy's configuration allows.
    max_total_tokens: int
    # KV-cache tokens the request holds at its end: every row's prompt and max_new_tokens.
    kv_tokens: int
    kv_capacity_tokens: int | None = None
    # Whether it would be admitted now; if not, the 429/503 message it would get.
    admitted: bool
    refusal: str | None = None


# Routes that stream with `"stream": true` answer 200 with Server-Sent Events too.
STREAM_TOO: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}}, "description": 'JSON, or with `"stream": true` Server-Sent Events'},
}

# The error statuses of the generation routes, for the OpenAPI document.
GENERATION_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {
        "model": ErrorResponse,
        "description": "a valid `Authorization: Bearer <key>` is required",
        "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
    },
    413: {"model": ErrorResponse, "description": "the body is over the server's size limit (refused unread)"},
    408: {
        "model": ErrorResponse,
        "description": "the request's deadline (`deadline_s`, `request_timeout_s`) passed, or its body did not "
        "arrive in time (`body_timeout_s`)",
    },
    422: {"model": ErrorResponse, "description": "invalid input; the message names the field and the limit"},
    424: {"model": ErrorResponse, "description": "the engine failed while generating"},
    429: {
        "model": ErrorResponse,
        "description": "the server is full (requests or RoPE slots), or the work queued ahead would keep the "
        "request waiting past `max_queue_wait_s`; retry after `Retry-After` seconds",
        "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}},
    },
    503: {"model": ErrorResponse, "description": "the engine is starting, down or restarting"},
}


class GenerateParameters(RequestBody):
    """TGI's `parameters` object; names and meanings follow TGI."""

    max_new_tokens: int | None = Field(default=None, ge=1)
    do_sample: StrictBool = False
    temperature: float | None = Field(default=None, gt=0, le=MAX_TEMPERATURE)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, gt=0, le=MAX_TOP_K)
    typical_p: float | None = None
    repetition_penalty: float | None = Field(default=None, gt=0, le=10)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stop: StopList = Field(default_factory=list)
    details: StrictBool = False
    decoder_input_details: StrictBool = False
    # The prompt the model reads, then the generated text, in `generated_text`.
    return_full_text: StrictBool | None = False
    # Only the last `truncate` tokens of the prompt the model reads are kept.
    truncate: int | None = Field(default=None, ge=1)
    watermark: StrictBool = False
    best_of: int | None = Field(default=None, ge=1, le=1)
    # The likeliest tokens at each generated position: `details.top_tokens`, a stream event's `top_tokens`.
    top_n_tokens: int | None = Field(default=None, ge=0, le=MAX_TOP_N_TOKENS)
    # Structured output: {"type": "json" | "regex" | "json_schema", "value": ...} (server/structured/fields.py).
    grammar: TgiGrammar | None = None
    adapter_id: str | None = None

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, stop: list[str]) -> list[str]:
        if any(not s for s in stop):
            raise ValueError("stop sequences must be non-empty strings")
        return stop

    @field_validator("adapter_id", "best_of")
    @classmethod
    def _unsupported(cls, value: Any, info: Any) -> Any:
        if value not in (None, 1):
            raise ValueError(f"{info.field_name} is not supported by ropeserve")
        return value

    @field_validator("typical_p")
    @classmethod
    def _no_typical_p(cls, value: float | None) -> float | None:
        if value is not None:
            raise ValueError("typical sampling is not supported by ropeserve (vLLM has no typical_p); leave it out")
        return value

    @field_validator("watermark")
    @classmethod
    def _no_watermark(cls, value: bool) -> bool:
        if value:
            raise ValueError("watermark is not supported by ropeserve")
        return value


class GenerateRequest(RequestBody):
    """Body of POST /generate, /generate_stream and / (TGI)."""

    inputs: str = Field(min_length=1)
    context: str | Texts | None = None
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    strategy: StrategySpec | None = None
    stream: StrictBool = False
    deadline_s: float | None = Field(
        default=None,
        gt=0,
        le=MAX_DEADLINE_S,
        description="seconds after arrival when the server aborts the request (408); the server's request_timeout_s caps it",
    )
    priority: int | None = Field(default=None, ge=MIN_PRIORITY, le=MAX_PRIORITY, description=PRIORITY_DESCRIPTION)
    dry_run: StrictBool = Field(default=False, description=DRY_RUN_DESCRIPTION)

    _documents = field_validator("context")(documents_not_empty)


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
    # With `top_n_tokens`: the likeliest tokens at each generated position, likeliest first.
    top_tokens: list[list[Token]] | None = None


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
    parallelism: ParallelismInfo | None = None


class ParallelismInfo(BaseModel):
    """The engine's vLLM parallel settings (Settings / `ropeserve serve` flags of the same names)."""

    tensor_parallel_size: int
    pipeline_parallel_size: int
    data_parallel_size: int
    distributed_executor_backend: str
    # Worker processes: tensor x pipeline x data parallel.
    ranks: int


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


class StreamOptions(RequestBody):
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False


# vLLM's router (PyPI vllm-router) re-serialises every OpenAI body it forwards through SGLang's
# request schema, which writes these fields at these values whether the client sent them or not.
# Each asks for what ropeserve does anyway (stop strings trimmed, special tokens skipped, no hidden
# states, the assistant's turn opened, no reasoning parser to separate), so a body may carry them
# at exactly these values; any other value is refused by name (docs/scaling.md, document affinity).
ROUTER_FILLED_FIELDS: dict[str, bool] = {
    "no_stop_trim": False,
    "skip_special_tokens": True,
    "return_hidden_states": False,
    "continue_final_message": False,
    "separate_reasoning": True,
    "stream_reasoning": True,
    "include_reasoning": True,
}


class OpenAIRequest(RequestBody, OpenAIConstraintFields):
    """The fields /v1/completions and /v1/chat/completions share; `strategy`, `context` and
    `deadline_s` are ropeserve's extra fields; `response_format` and `structured_outputs` come from
    OpenAIConstraintFields (structured output)."""

    model: str | None = None
    temperature: float | None = Field(default=None, ge=0, le=MAX_TEMPERATURE)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1, le=MAX_TOP_K)
    n: int = Field(default=1, ge=1, le=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    # A string is one stop sequence; the limit counts a list's items.
    stop: str | StopList | None = None
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: float | None = Field(default=None, gt=0, le=10)
    ignore_eos: StrictBool = False
    user: str | None = None
    # Refused unless empty: its values are not checked one by one.
    logit_bias: dict[str, Any] | None = Field(default=None, max_length=MAX_REFUSED_ITEMS)
    strategy: StrategySpec | None = None
    context: str | Texts | None = None
    deadline_s: float | None = Field(
        default=None,
        gt=0,
        le=MAX_DEADLINE_S,
        description="ropeserve's extra field: seconds after arrival when the server aborts the request (408)",
    )
    # A top-level field, as in vLLM's OpenAI server.
    priority: int | None = Field(default=None, ge=MIN_PRIORITY, le=MAX_PRIORITY, description=PRIORITY_DESCRIPTION)
    dry_run: StrictBool = Field(default=False, description=DRY_RUN_DESCRIPTION)

    _documents = field_validator("context")(documents_not_empty)

    @model_validator(mode="before")
    @classmethod
    def _router_filled_fields(cls, data: Any) -> Any:
        """The fields a router fills in at ropeserve's own behaviour are dropped; other values are errors."""
        if not isinstance(data, dict) or data.keys().isdisjoint(ROUTER_FILLED_FIELDS):
            return data
        kept = dict(data)
        for name, value in ROUTER_FILLED_FIELDS.items():
            if name in kept and kept.pop(name) is not value:
                raise ValueError(f"{name}: only {json.dumps(value)} is supported by ropeserve")
        return kept

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value:
            raise ValueError("logit_bias is not supported by ropeserve")
        return value

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if stop is not None and any(not s for s in ([stop] if isinstance(stop, str) else stop)):
            raise ValueError("stop sequences must be non-empty strings")
        return stop

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> OpenAIRequest:
        # vLLM answers this with a 400: there is no stream for the options to shape.
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: can only be given with stream: true")
        return self

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(OpenAIRequest):
    """Body of POST /v1/completions.

    `prompt`: a string or token ids, alone or as a one-element list (one prompt per request).
    `echo` with `logprobs: N` returns the prompt's tokens and logprobs before the completion's, as
    vLLM does; `max_tokens: 0` (only with `echo`) returns the prompt alone."""

    prompt: str | Texts | TokenIds | Annotated[list[TokenIds], Field(max_length=MAX_DOCUMENTS, fail_fast=True)] = Field(
        min_length=1
    )
    max_tokens: int | None = Field(default=16, ge=0)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: StrictBool = False
    best_of: int | None = Field(default=None, ge=1, le=1)
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _single_prompt(
        cls, prompt: str | list[str] | list[int] | list[list[int]]
    ) -> str | list[str] | list[int] | list[list[int]]:
        if isinstance(prompt, str) or all(isinstance(t, int) for t in prompt):
            return prompt
        if len(prompt) != 1 or not prompt[0]:
            raise ValueError("exactly one non-empty prompt (a string or a list of token ids) is supported")
        return prompt

    @model_validator(mode="after")
    def _echo_for_zero_tokens(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: 0 is only allowed with echo (the prompt alone is returned)")
        if self.echo and self.constraint() is not None:
            raise ValueError(
                "echo: the prompt before a constrained output would not match its constraint; leave out echo "
                "(or the constraint)"
            )
        return self

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("suffix is not supported by ropeserve")
        return value

    def prompt_value(self) -> str | list[int]:
        """The one prompt: its text, or its token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return prompt
        if all(isinstance(t, int) for t in prompt):
            return [t for t in prompt if isinstance(t, int)]
        first = prompt[0]
        if isinstance(first, str):
            return first
        return [t for t in first] if isinstance(first, list) else [first]


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
    """A model of /v1/models: the served model, or a preset (`parent`: the served model) that
    selects `strategy` when a request names it as its `model`."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ropeserve"
    # The longest prompt + max_tokens the model's strategy allows on this server.
    max_model_len: int
    root: str | None = None
    parent: str | None = None
    strategy: StrategySpec | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- OpenAI-compatible chat completions --------------------------------------------------------


class TextPart(RequestBody):
    type: Literal["text"]
    text: str


class ChatMessage(RequestBody):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | Annotated[list[TextPart], Field(max_length=MAX_CONTENT_PARTS, fail_fast=True)] | None = None
    name: str | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(OpenAIRequest):
    """Body of POST /v1/chat/completions.

    The messages go through the model's chat template (with the assistant's turn opened); the
    `context` documents come before that text as for every route (docs/CONTRACT.md's join)."""

    messages: Annotated[list[ChatMessage], Field(max_length=MAX_MESSAGES, fail_fast=True)] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: list[Any] | None = Field(default=None, max_length=MAX_REFUSED_ITEMS)

    _parts = model_validator(mode="before")(count_content_parts)

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, value: list[Any] | None) -> list[Any] | None:
        if value:
            raise ValueError("tools is not supported by ropeserve")
        return value

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs: true")
        return self


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["length", "stop"] | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    strategy: dict[str, Any] | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["length", "stop"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


# --- vLLM's /tokenize and /detokenize ----------------------------------------------------------


class TokenizeCompletionRequest(RequestBody):
    """vLLM's /tokenize body for a prompt; `context` (ropeserve's) puts documents before it, as the
    generation routes do, so that `count` is the prompt the plain strategies read."""

    model: str | None = None
    prompt: str
    add_special_tokens: StrictBool = True
    return_token_strs: StrictBool | None = False
    context: str | Texts | None = None

    _documents = field_validator("context")(documents_not_empty)


class TokenizeChatRequest(RequestBody):
    """vLLM's /tokenize body for a conversation: through the model's chat template."""

    model: str | None = None
    messages: Annotated[list[ChatMessage], Field(max_length=MAX_MESSAGES, fail_fast=True)] = Field(min_length=1)
    add_generation_prompt: StrictBool = True
    add_special_tokens: StrictBool = False
    return_token_strs: StrictBool | None = False
    context: str | Texts | None = None

    _documents = field_validator("context")(documents_not_empty)
    _parts = model_validator(mode="before")(count_content_parts)


class TokenizeResponse(BaseModel):
    count: int
    # The longest prompt + max_tokens the `model` asked for (served model or preset) allows.
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(RequestBody):
    model: str | None = None
    tokens: TokenIds


class DetokenizeResponse(BaseModel):
    prompt: str
