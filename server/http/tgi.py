"""TGI-compatible routes: /generate, /generate_stream and / (docs/CONTRACT.md).

TGI's parameters keep TGI's meanings: `truncate` keeps the last N tokens of the prompt the model
reads (then a token-id prompt), `return_full_text` puts that prompt (as sent) before
`generated_text`, and `top_n_tokens` reports the likeliest tokens at each generated position.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse

from server.engines.base import TokenEvent
from server.http.body_values import tgi_request_values
from server.http.errors import as_api_error, error_body
from server.http.generation_result import GenerationResult, collect
from server.http.guarded_route import GuardedRoute
from server.http.large_replies import built_reply
from server.http.preparation import RouteRequest, Serving, dry_run, get_serving, prepare_job
from server.http.sse import SSE_HEADERS, SSE_MEDIA_TYPE, sse_event, until_disconnect
from server.schemas import (
    DRY_RUN_JSON,
    GENERATION_ERRORS,
    STREAM_TOO,
    Details,
    DryRunResponse,
    GenerateRequest,
    GenerateResponse,
    PrefillToken,
    StreamDetails,
    StreamResponse,
    Token,
)
from server.service.generation_service import GenerationService, JobDraft
from server.service.jobs import Job
from server.settings import Settings

router = APIRouter(route_class=GuardedRoute)

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


async def _route_request(
    body: GenerateRequest, service: GenerationService, settings: Settings
) -> tuple[RouteRequest, Reply]:
    documents, sampling = tgi_request_values(body, settings)
    params = body.parameters
    reply = Reply(
        prefix=service.plain_prompt(body.inputs, documents) if params.return_full_text else "",
        top_n=params.top_n_tokens or 0,
        special=frozenset(service.tokenizer.all_special_ids),
    )
    prompt: str | list[int] = body.inputs
    if params.truncate is not None:
        ids = await service.last_prompt_tokens(body.inputs, documents, params.truncate)
        if ids is not None:  # cut: its last tokens are the prompt, as token ids
            prompt, documents = ids, ()
    draft = JobDraft(prompt, documents, sampling, body.strategy, body.deadline_s, body.priority)
    return RouteRequest(draft, "parameters.top_n_tokens" if reply.top_n else None), reply


async def _answer(
    request: Request, body: GenerateRequest, serving: Serving, stream: bool, listed: bool = False
) -> GenerateResponse | Response:
    """The reply: SSE, or one object (`listed`: a large reply rendered here comes in a list, as `/` answers)."""
    service = serving.service
    asked, reply = await _route_request(body, service, serving.settings)
    if body.dry_run:
        return await dry_run(service, asked)
    job = await prepare_job(service, asked)
    if stream:
        return StreamingResponse(_stream_events(service, job, reply), media_type=SSE_MEDIA_TYPE, headers=SSE_HEADERS)
    result = await until_disconnect(request, collect(service.run(job)))
    details = body.parameters.details
    answer = await built_reply(lambda: _response(job, reply, result, details), result, exclude_none=True, listed=listed)
    assert isinstance(answer, GenerateResponse | Response)
    return answer


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


def _route(stream: bool) -> Callable[..., Awaitable[GenerateResponse | Response]]:
    """/generate (one JSON object) and /generate_stream (SSE) differ only in how they answer."""

    async def route(
        request: Request, body: GenerateRequest, serving: Serving = Depends(get_serving)
    ) -> GenerateResponse | Response:
        return await _answer(request, body, serving, stream=stream)

    return route


# How each answers its 200: one JSON object, or (response_class=Response: no JSON body documented but a
# dry run's) SSE.
TGI_ROUTES: dict[str, tuple[bool, dict[str, Any]]] = {
    "/generate": (
        False,
        {"response_model": GenerateResponse | DryRunResponse, "response_model_exclude_none": True, "responses": ERRORS},
    ),
    "/generate_stream": (
        True,
        {
            "response_class": Response,
            "response_model": None,
            "responses": {200: {"content": {SSE_MEDIA_TYPE: {}, **DRY_RUN_JSON}}, **ERRORS},
        },
    ),
}
for path, (streams, answers) in TGI_ROUTES.items():
    router.add_api_route(path, _route(streams), methods=["POST"], name=path.strip("/"), **answers)


@router.post(
    "/",
    response_model=list[GenerateResponse] | DryRunResponse,
    response_model_exclude_none=True,
    responses={**ERRORS, **STREAM_TOO},
)
async def compat_generate(
    request: Request,
    body: GenerateRequest,
    serving: Serving = Depends(get_serving),
) -> list[GenerateResponse] | Response:
    answer = await _answer(request, body, serving, stream=body.stream, listed=True)
    return answer if isinstance(answer, Response) else [answer]
