"""TGI-compatible routes: /generate, /generate_stream and / (CONTRACT.md)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse

from server.deps import get_service, get_settings_dep, require_api_key
from server.engines.base import TokenEvent
from server.errors import as_api_error, error_body
from server.generation import GenerationResult, collect, tgi_request_values
from server.schemas import (
    GENERATION_ERRORS,
    STREAM_TOO,
    Details,
    GenerateRequest,
    GenerateResponse,
    PrefillToken,
    StreamDetails,
    StreamResponse,
    Token,
)
from server.service import GenerationService, Job
from server.settings import Settings
from server.sse import SSE_HEADERS, SSE_MEDIA_TYPE, sse_event, until_disconnect

router = APIRouter(dependencies=[Depends(require_api_key)])

ERRORS = GENERATION_ERRORS


async def _prepare(body: GenerateRequest, service: GenerationService, settings: Settings) -> Job:
    documents, sampling = tgi_request_values(body, settings)
    job = await service.prepare(body.inputs, documents, sampling, body.strategy, body.deadline_s)
    service.check_capacity(job)
    return job


def _token(event: TokenEvent) -> Token:
    return Token(id=event.id, text=event.text, logprob=event.logprob, special=event.special)


def _response(job: Job, result: GenerationResult, with_details: bool) -> GenerateResponse:
    details = None
    if with_details:
        details = Details(
            finish_reason=result.finish_reason,
            generated_tokens=len(result.tokens),
            seed=job.sampling.seed if not job.sampling.greedy else None,
            input_length=job.plan.prompt_tokens,
            prefill=[PrefillToken(id=t.id, text=t.text, logprob=t.logprob) for t in result.prompt_logprobs or []],
            tokens=[_token(t) for t in result.tokens],
        )
    return GenerateResponse(generated_text=result.text, details=details, strategy=job.describe())


async def _generate(
    request: Request, body: GenerateRequest, service: GenerationService, settings: Settings
) -> GenerateResponse:
    job = await _prepare(body, service, settings)
    result = await until_disconnect(request, collect(service.run(job)))
    return _response(job, result, body.parameters.details)


async def _stream_events(service: GenerationService, job: Job) -> AsyncIterator[str]:
    result = GenerationResult()
    index = 0
    try:
        async for step in service.run(job):
            result.add(step)
            for i, event in enumerate(step.tokens):
                index += 1
                last = step.finished and i == len(step.tokens) - 1
                yield sse_event(_stream_response(job, result, index, _token(event), last))
            if step.finished and not step.tokens:
                index += 1
                yield sse_event(_stream_response(job, result, index, Token(id=-1, text="", special=True), True))
    except Exception as exc:  # noqa: BLE001 - the status line is gone: report in-band, as TGI does
        err = as_api_error(exc)
        yield sse_event(error_body(err.message, err.error_type))


def _stream_response(job: Job, result: GenerationResult, index: int, token: Token, last: bool) -> StreamResponse:
    if not last:
        return StreamResponse(index=index, token=token)
    return StreamResponse(
        index=index,
        token=token,
        generated_text=result.text,
        details=StreamDetails(
            finish_reason=result.finish_reason,
            generated_tokens=len(result.tokens),
            seed=job.sampling.seed if not job.sampling.greedy else None,
            input_length=job.plan.prompt_tokens,
        ),
        strategy=job.describe(),
    )


async def _stream(body: GenerateRequest, service: GenerationService, settings: Settings) -> StreamingResponse:
    job = await _prepare(body, service, settings)
    return StreamingResponse(_stream_events(service, job), media_type=SSE_MEDIA_TYPE, headers=SSE_HEADERS)


@router.post("/generate", response_model=GenerateResponse, response_model_exclude_none=True, responses=ERRORS)
async def generate(
    request: Request,
    body: GenerateRequest,
    service: GenerationService = Depends(get_service),
    settings: Settings = Depends(get_settings_dep),
) -> GenerateResponse:
    return await _generate(request, body, service, settings)


# response_class=Response: no JSON body is documented for the 200, only the event stream.
@router.post("/generate_stream", response_class=Response, responses={200: {"content": {SSE_MEDIA_TYPE: {}}}, **ERRORS})
async def generate_stream(
    body: GenerateRequest,
    service: GenerationService = Depends(get_service),
    settings: Settings = Depends(get_settings_dep),
) -> StreamingResponse:
    return await _stream(body, service, settings)


@router.post(
    "/", response_model=list[GenerateResponse], response_model_exclude_none=True, responses={**ERRORS, **STREAM_TOO}
)
async def compat_generate(
    request: Request,
    body: GenerateRequest,
    service: GenerationService = Depends(get_service),
    settings: Settings = Depends(get_settings_dep),
) -> list[GenerateResponse] | StreamingResponse:
    if body.stream:
        return await _stream(body, service, settings)
    return [await _generate(request, body, service, settings)]
