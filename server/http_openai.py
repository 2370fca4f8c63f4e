"""OpenAI-compatible /v1/completions and /v1/models; `strategy` and `context` are extra body fields.

Echo and prompt logprobs follow vLLM's OpenAI server: with `echo`, the prompt's text comes before
the completion's, and with `logprobs: N` its tokens too (the first one's logprob null), each with
its `top_logprobs` (the token itself and the N likeliest); `max_tokens: 0` returns the prompt alone.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from server.deps import get_service, get_settings_dep, require_api_key
from server.engines.base import FinishReason, TokenEvent
from server.errors import ApiError, as_api_error, error_body
from server.generation import (
    GenerationResult,
    collect,
    documents_of,
    openai_sampling,
    refuse_combined_echo,
    refuse_combined_logprobs,
)
from server.schemas import (
    GENERATION_ERRORS,
    STREAM_TOO,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    Usage,
    clipped,
)
from server.service import GenerationService, Job
from server.settings import Settings
from server.sse import SSE_HEADERS, SSE_MEDIA_TYPE, sse_event, until_disconnect

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])
# The OpenAI routes' errors: the generation routes' and vLLM's 404 for a model it does not serve.
ERRORS: dict[int | str, dict[str, Any]] = {
    **GENERATION_ERRORS,
    404: {"model": ErrorResponse, "description": "`model` names a model this server does not serve"},
}
# JSON has no -inf: the floor OpenAI and vLLM report instead.
LOGPROB_FLOOR = -9999.0


def finish(reason: FinishReason | None) -> Literal["length", "stop"] | None:
    if reason is None:
        return None
    return "length" if reason == "length" else "stop"


def logprob(value: float) -> float:
    return max(value, LOGPROB_FLOOR)


def usage(job: Job, generated: int) -> Usage:
    return Usage(
        prompt_tokens=job.plan.prompt_tokens,
        completion_tokens=generated,
        total_tokens=job.plan.prompt_tokens + generated,
    )


def model_name(service: GenerationService, settings: Settings) -> str:
    return settings.served_model_name or service.model.model_id


def served_model(service: GenerationService, settings: Settings, asked: str | None) -> str:
    """The served model's name, which a request's `model` must be when it gives one (left out or
    empty: the served model, as vLLM does); any other is a 404, with vLLM's message."""
    served = model_name(service, settings)
    if asked and asked != served:
        raise ApiError(
            404, f"model: The model `{clipped(asked)}` does not exist; this server serves `{served}`", "validation"
        )
    return served


def completion_logprobs(tokens: list[TokenEvent], first_offset: int = 0) -> CompletionLogprobs:
    """OpenAI's completion logprobs: token texts, their logprobs, the likeliest per position,
    and each token's character offset in the returned text."""
    offsets, at = [], first_offset
    for token in tokens:
        offsets.append(at)
        at += len(token.text)
    return CompletionLogprobs(
        tokens=[t.text for t in tokens],
        token_logprobs=[None if t.logprob is None else logprob(t.logprob) for t in tokens],
        top_logprobs=[None if t.logprob is None else {top.text: logprob(top.logprob) for top in t.top} for t in tokens],
        text_offset=offsets,
    )


@router.get("/models", response_model=ModelList)
async def models(
    service: GenerationService = Depends(get_service), settings: Settings = Depends(get_settings_dep)
) -> ModelList:
    card = ModelCard(id=model_name(service, settings), created=0, max_model_len=service.model.native_window)
    return ModelList(data=[card])


async def _prepare(body: CompletionRequest, service: GenerationService, settings: Settings) -> Job:
    prompt = body.prompt_value()
    documents = documents_of(body.context)
    ids = prompt if isinstance(prompt, list) else None
    if ids is not None:
        service.check_token_ids(ids, documents)  # before decoding: ids outside the vocabulary are a 422
    inputs = service.tokenizer.decode(ids) if ids is not None else str(prompt)
    sampling = openai_sampling(body, settings, inputs)
    job = await service.prepare(inputs, documents, sampling, body.strategy, body.deadline_s, prompt_token_ids=ids)
    refuse_combined_logprobs(job, body.logprobs is not None)
    refuse_combined_echo(job, body.echo)
    service.check_capacity(job)
    return job


@router.post("/completions", response_model=CompletionResponse, responses={**ERRORS, **STREAM_TOO})
async def completions(
    request: Request,
    body: CompletionRequest,
    service: GenerationService = Depends(get_service),
    settings: Settings = Depends(get_settings_dep),
) -> CompletionResponse | StreamingResponse:
    model = served_model(service, settings, body.model)
    job = await _prepare(body, service, settings)
    # The echoed prompt: the text the model reads (documents, blank line, prompt).
    prompt_text = job.request.plain_prompt()
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _stream(service, job, body, prompt_text, model, include_usage)
        return StreamingResponse(events, media_type=SSE_MEDIA_TYPE, headers=SSE_HEADERS)
    result = await until_disconnect(request, collect(service.run(job)))
    generated = [] if body.max_tokens == 0 else result.tokens
    text = "" if body.max_tokens == 0 else result.text
    tokens = generated
    if body.echo:
        text = prompt_text + text
        tokens = [*(result.prompt_logprobs or []), *generated]
    choice = CompletionChoice(
        text=text,
        finish_reason="length" if body.max_tokens == 0 else finish(result.finish_reason),
        logprobs=completion_logprobs(tokens) if body.logprobs is not None else None,
    )
    return CompletionResponse(
        id=f"cmpl-{job.request_id}",
        created=int(time.time()),
        model=model,
        choices=[choice],
        usage=usage(job, len(generated)),
        strategy=job.describe(),
    )


async def _stream(
    service: GenerationService, job: Job, body: CompletionRequest, prompt_text: str, model: str, include_usage: bool
) -> AsyncIterator[str]:
    created = int(time.time())
    result = GenerationResult()
    offset = 0
    echo_pending = body.echo

    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        body = CompletionResponse(
            id=f"cmpl-{job.request_id}", created=created, model=model, choices=choices, usage=usage
        )
        data = body.model_dump(mode="json")
        return sse_event({k: v for k, v in data.items() if v is not None})

    try:
        async for step in service.run(job):
            result.add(step)
            text, tokens = ("", []) if body.max_tokens == 0 else (step.text, step.tokens)
            if echo_pending:
                echo_pending = False
                text, tokens = prompt_text + text, [*(step.prompt_logprobs or []), *tokens]
            reason = None
            if step.finished:
                reason = "length" if body.max_tokens == 0 else finish(step.finish_reason)
            if tokens or text or reason:
                logprobs = completion_logprobs(tokens, offset) if body.logprobs is not None else None
                offset += sum(len(t.text) for t in tokens)
                yield chunk([CompletionChoice(text=text, finish_reason=reason, logprobs=logprobs)])
        if include_usage:
            yield chunk([], usage(job, 0 if body.max_tokens == 0 else len(result.tokens)))
    except Exception as exc:  # noqa: BLE001 - the status line is gone: report in-band, as vLLM does
        err = as_api_error(exc)
        yield sse_event(error_body(err.message, err.error_type))
    yield sse_event("[DONE]")
