"""OpenAI-compatible /v1/completions and /v1/models; `strategy` and `context` are extra body fields."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from server.deps import get_service, get_settings_dep, require_api_key
from server.engines.base import FinishReason, TokenEvent
from server.errors import as_api_error, error_body
from server.generation import GenerationResult, collect, documents_of, openai_sampling
from server.schemas import (
    GENERATION_ERRORS,
    STREAM_TOO,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    Usage,
)
from server.service import GenerationService, Job
from server.settings import Settings
from server.sse import SSE_HEADERS, SSE_MEDIA_TYPE, sse_event, until_disconnect

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])
ERRORS = GENERATION_ERRORS


def _finish(reason: FinishReason | None) -> Literal["length", "stop"] | None:
    if reason is None:
        return None
    return "length" if reason == "length" else "stop"


def _usage(job: Job, generated: int) -> Usage:
    return Usage(
        prompt_tokens=job.plan.prompt_tokens,
        completion_tokens=generated,
        total_tokens=job.plan.prompt_tokens + generated,
    )


def _logprobs(job: Job, tokens: list[TokenEvent]) -> CompletionLogprobs | None:
    if not job.sampling.top_logprobs:
        return None
    return CompletionLogprobs(tokens=[t.text for t in tokens], token_logprobs=[t.logprob for t in tokens])


def _model_name(service: GenerationService, settings: Settings) -> str:
    return settings.served_model_name or service.model.model_id


@router.get("/models", response_model=ModelList)
async def models(
    service: GenerationService = Depends(get_service), settings: Settings = Depends(get_settings_dep)
) -> ModelList:
    card = ModelCard(id=_model_name(service, settings), created=0, max_model_len=service.model.native_window)
    return ModelList(data=[card])


@router.post("/completions", response_model=CompletionResponse, responses={**ERRORS, **STREAM_TOO})
async def completions(
    request: Request,
    body: CompletionRequest,
    service: GenerationService = Depends(get_service),
    settings: Settings = Depends(get_settings_dep),
) -> CompletionResponse | StreamingResponse:
    sampling = openai_sampling(body, settings)
    job = await service.prepare(
        body.prompt_text(), documents_of(body.context), sampling, body.strategy, body.deadline_s
    )
    service.check_capacity(job)
    model = body.model or _model_name(service, settings)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _stream(service, job, model, include_usage)
        return StreamingResponse(events, media_type=SSE_MEDIA_TYPE, headers=SSE_HEADERS)
    result = await until_disconnect(request, collect(service.run(job)))
    choice = CompletionChoice(
        text=result.text, finish_reason=_finish(result.finish_reason), logprobs=_logprobs(job, result.tokens)
    )
    return CompletionResponse(
        id=f"cmpl-{job.request_id}",
        created=int(time.time()),
        model=model,
        choices=[choice],
        usage=_usage(job, len(result.tokens)),
        strategy=job.describe(),
    )


async def _stream(service: GenerationService, job: Job, model: str, include_usage: bool) -> AsyncIterator[str]:
    created = int(time.time())
    result = GenerationResult()

    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        body = CompletionResponse(
            id=f"cmpl-{job.request_id}", created=created, model=model, choices=choices, usage=usage
        )
        data = body.model_dump(mode="json")
        return sse_event({k: v for k, v in data.items() if v is not None})

    try:
        async for step in service.run(job):
            result.add(step)
            finish = _finish(step.finish_reason) if step.finished else None
            if step.tokens or step.text or finish:
                choice = CompletionChoice(text=step.text, finish_reason=finish, logprobs=_logprobs(job, step.tokens))
                yield chunk([choice])
        if include_usage:
            yield chunk([], _usage(job, len(result.tokens)))
    except Exception as exc:  # noqa: BLE001 - the status line is gone: report in-band, as vLLM does
        err = as_api_error(exc)
        yield sse_event(error_body(err.message, err.error_type))
    yield sse_event("[DONE]")
