"""TGI-compatible routes: /generate, /generate_stream and / (docs/CONTRACT.md).

TGI's parameters keep TGI's meanings: `truncate` keeps the last N tokens of the prompt the model
reads (then a token-id prompt), `return_full_text` puts that prompt (as sent) before
`generated_text`, and `top_n_tokens` reports the likeliest tokens at each generated position.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse

from server.deps import get_service, get_settings_dep, require_api_key
from server.engines.base import TokenEvent
from server.errors import as_api_error, error_body
from server.generation import GenerationResult, collect, refuse_combined_logprobs, tgi_request_values
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


@dataclass(frozen=True)
class Reply:
    """What a TGI reply adds around the generated tokens: `return_full_text`'s prefix, and
    `top_n_tokens` (0: none) with the tokenizer's special ids to mark them."""

    prefix: str = ""
    top_n: int = 0
    special: frozenset[int] = frozenset()

    def top_tokens(self, event: TokenEvent) -> list[Token]:
        """The `top_n` likeliest tokens at the event's position, likeliest first (the engine's
        list also holds the chosen token, which may rank lower)."""
        ranked = sorted(event.top, key=lambda t: t.logprob, reverse=True)[: self.top_n]
        return [Token(id=t.id, text=t.text, logprob=t.logprob, special=t.id in self.special) for t in ranked]


async def _prepare(body: GenerateRequest, service: GenerationService, settings: Settings) -> tuple[Job, Reply]:
    documents, sampling = tgi_request_values(body, settings)
    params = body.parameters
    reply = Reply(
        prefix=service.plain_prompt(body.inputs, documents) if params.return_full_text else "",
        top_n=params.top_n_tokens or 0,
        special=frozenset(service.tokenizer.all_special_ids),
    )
    inputs, ids = body.inputs, None
    if params.truncate is not None:
        ids = await service.last_prompt_tokens(inputs, documents, params.truncate)
    if ids is not None:  # cut: its last tokens are the prompt, as token ids
        inputs, documents = service.tokenizer.decode(ids), ()
    job = await service.prepare(inputs, documents, sampling, body.strategy, body.deadline_s, prompt_token_ids=ids)
    refuse_combined_logprobs(job, reply.top_n > 0, "parameters.top_n_tokens")
    service.check_capacity(job)
    return job, reply


def _token(event: TokenEvent) -> Token:
    return Token(id=event.id, text=event.text, logprob=event.logprob, special=event.special)


def _response(job: Job, reply: Reply, result: GenerationResult, with_details: bool) -> GenerateResponse:
    details = None
    if with_details:
        details = Details(
            finish_reason=result.finish_reason,
            generated_tokens=len(result.tokens),
            seed=job.sampling.seed if not job.sampling.greedy else None,
            input_length=job.plan.prompt_tokens,
            prefill=[PrefillToken(id=t.id, text=t.text, logprob=t.logprob) for t in result.prompt_logprobs or []],
            tokens=[_token(t) for t in result.tokens],
            top_tokens=[reply.top_tokens(t) for t in result.tokens] if reply.top_n else None,
        )
    return GenerateResponse(generated_text=reply.prefix + result.text, details=details, strategy=job.describe())


async def _generate(
    request: Request, body: GenerateRequest, service: GenerationService, settings: Settings
) -> GenerateResponse:
    job, reply = await _prepare(body, service, settings)
    result = await until_disconnect(request, collect(service.run(job)))
    return _response(job, reply, result, body.parameters.details)


async def _stream_events(service: GenerationService, job: Job, reply: Reply) -> AsyncIterator[str]:
    result = GenerationResult()
    index = 0
    try:
        async for step in service.run(job):
            result.add(step)
            for i, event in enumerate(step.tokens):
                index += 1
                last = step.finished and i == len(step.tokens) - 1
                top = reply.top_tokens(event) if reply.top_n else None
                yield sse_event(_stream_response(job, reply, result, index, _token(event), top, last))
            if step.finished and not step.tokens:
                index += 1
                end = Token(id=-1, text="", special=True)
                yield sse_event(_stream_response(job, reply, result, index, end, [] if reply.top_n else None, True))
    except Exception as exc:  # noqa: BLE001 - the status line is gone: report in-band, as TGI does
        err = as_api_error(exc)
        yield sse_event(error_body(err.message, err.error_type))


def _stream_response(
    job: Job, reply: Reply, result: GenerationResult, index: int, token: Token, top: list[Token] | None, last: bool
) -> StreamResponse:
    if not last:
        return StreamResponse(index=index, token=token, top_tokens=top)
    return StreamResponse(
        index=index,
        token=token,
        top_tokens=top,
        generated_text=reply.prefix + result.text,
        details=StreamDetails(
            finish_reason=result.finish_reason,
            generated_tokens=len(result.tokens),
            seed=job.sampling.seed if not job.sampling.greedy else None,
            input_length=job.plan.prompt_tokens,
        ),
        strategy=job.describe(),
    )


async def _stream(body: GenerateRequest, service: GenerationService, settings: Settings) -> StreamingResponse:
    job, reply = await _prepare(body, service, settings)
    return StreamingResponse(_stream_events(service, job, reply), media_type=SSE_MEDIA_TYPE, headers=SSE_HEADERS)


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
