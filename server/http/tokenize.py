"""vLLM's /tokenize and /detokenize (docs/CONTRACT.md): size a prompt before sending it.

`{"prompt"}` or `{"messages"}` (through the model's chat template) -> `{"count", "max_model_len",
"tokens"}` (and `token_strs` when asked); `{"tokens"}` -> `{"prompt"}`. `model`, when given, is the
served model or a preset (else 404, as on the OpenAI routes), and `max_model_len` is what its
strategy allows. `context` (ropeserve's field) puts documents before the prompt, joined as on every
generation route, so that `count` is what the plain strategies read.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol, runtime_checkable

from fastapi import APIRouter, Body, Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, TypeAdapter, ValidationError

from server.http.body_checks import check_input_chars
from server.http.body_values import documents_of
from server.http.chat import chat_prompt, message_texts
from server.http.deps import get_service, get_settings_dep
from server.http.errors import validation_error
from server.http.guarded_route import GuardedRoute
from server.http.openai import ERRORS
from server.http.presets import ServedModels, get_served_models
from server.schemas import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
)
from server.service.generation_service import GenerationService
from server.settings import Settings

router = APIRouter(route_class=GuardedRoute)
SCHEMA_REF = "#/components/schemas/{model}"
_BODY_SCHEMA = TypeAdapter(TokenizeCompletionRequest | TokenizeChatRequest).json_schema(ref_template=SCHEMA_REF)
# The two shapes (and what they use), for the OpenAPI document's components.
TOKENIZE_SCHEMAS: dict[str, Any] = _BODY_SCHEMA.pop("$defs")
TOKENIZE_BODY = {
    "description": 'vLLM\'s TokenizeCompletionRequest `{"prompt"}` or TokenizeChatRequest `{"messages"}`',
    "content": {"application/json": {"schema": _BODY_SCHEMA}},
}


def document_tokenize_bodies(app: FastAPI) -> None:
    """/tokenize parses its body itself (one plain error, whichever shape was meant); the shapes its
    OpenAPI body points to are added to the document's components here."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            for name, definition in TOKENIZE_SCHEMAS.items():
                schema.setdefault("components", {}).setdefault("schemas", {}).setdefault(name, definition)
        return app.openapi_schema or {}

    setattr(app, "openapi", openapi)  # noqa: B010 - FastAPI's documented way to extend its OpenAPI document


@runtime_checkable
class TokenStrings(Protocol):
    """A Hugging Face tokenizer's token strings (vLLM's `token_strs`: "Ġthe", not " the")."""

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]: ...


def _parsed(model: type[BaseModel], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


async def _tokens(
    service: GenerationService, settings: Settings, body: TokenizeCompletionRequest | TokenizeChatRequest
) -> list[int]:
    """The body's prompt tokenized, under the generation routes' limit on input characters."""
    documents = documents_of(body.context)
    if isinstance(body, TokenizeChatRequest):
        check_input_chars(settings, [*message_texts(body.messages), *documents], "messages")
        prompt = await chat_prompt(service, body.messages, body.add_generation_prompt)
    else:
        check_input_chars(settings, [body.prompt, *documents], "prompt")
        prompt = body.prompt
    return await service.tokenize_text(service.plain_prompt(prompt, documents), body.add_special_tokens)


def _token_strings(service: GenerationService, tokens: list[int]) -> list[str]:
    tokenizer = service.tokenizer
    if isinstance(tokenizer, TokenStrings):
        return tokenizer.convert_ids_to_tokens(tokens)
    return [tokenizer.decode([t]) for t in tokens]


@router.post(
    "/tokenize",
    response_model=TokenizeResponse,
    response_model_exclude_none=True,
    responses=ERRORS,
    openapi_extra={"requestBody": TOKENIZE_BODY},
)
async def tokenize(
    data: Any = Body(...),
    service: GenerationService = Depends(get_service),
    settings: Settings = Depends(get_settings_dep),
    served: ServedModels = Depends(get_served_models),
) -> TokenizeResponse:
    chat = isinstance(data, dict) and "messages" in data
    body = _parsed(TokenizeChatRequest if chat else TokenizeCompletionRequest, data)
    max_model_len = served.max_model_len_of(body.model)
    tokens = await _tokens(service, settings, body)
    strings = None
    if body.return_token_strs:
        strings = await asyncio.to_thread(_token_strings, service, tokens)
    return TokenizeResponse(count=len(tokens), max_model_len=max_model_len, tokens=tokens, token_strs=strings)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=ERRORS)
async def detokenize(
    body: DetokenizeRequest,
    service: GenerationService = Depends(get_service),
    served: ServedModels = Depends(get_served_models),
) -> DetokenizeResponse:
    served.resolve(body.model, None)
    vocab = service.model.vocab_size
    if (bad := next((t for t in body.tokens if not 0 <= t < vocab), None)) is not None:
        raise validation_error(f"tokens: token id {bad} is outside the vocabulary (0..{vocab - 1})")
    return DetokenizeResponse(prompt=await service.decode(body.tokens))
