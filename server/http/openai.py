"""OpenAI-compatible /v1/completions and /v1/models; `strategy`, `context` and `dry_run` are extra
body fields, and `model` may name a strategy preset (server/http/presets.py).

Echo and prompt logprobs follow vLLM's OpenAI server: with `echo`, the prompt's text comes before
the completion's, and with `logprobs: N` its tokens too (the first one's logprob null), each with
its `top_logprobs` (the token itself and the N likeliest); `max_tokens: 0` returns the prompt alone.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from server.engines.base import FinishReason, SamplingOptions, TokenEvent
from server.http.body_values import documents_of, openai_sampling
from server.http.errors import as_api_error, error_body
from server.http.generation_result import GenerationResult, collect
from server.http.guarded_route import GuardedRoute
from server.http.large_replies import ENTRIES_IN_THREAD, built_reply, logprob_entries
from server.http.preparation import RouteRequest, Serving, dry_run, get_serving, prepare_job
from server.http.presets import ServedModels, get_served_models
from server.http.sse import SSE_HEADERS, SSE_MEDIA_TYPE, sse_event, until_disconnect
from server.schemas import (
    GENERATION_ERRORS,
    STREAM_TOO,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DryRunResponse,
    ModelList,
    OpenAIErrorResponse,
    OpenAIRequest,
    Usage,
)
from server.service.generation_service import GenerationService, JobDraft
from server.service.jobs import Job

router = APIRouter(prefix="/v1", route_class=GuardedRoute)
# The OpenAI routes' errors: the generation routes' and vLLM's 404 for a model it does not serve.
ERRORS: dict[int | str, dict[str, Any]] = {
    **GENERATION_ERRORS,
    404: {
        "model": OpenAIErrorResponse,
        "description": "`model` is neither the served model nor a preset (GET /v1/models); OpenAI's error shape",
    },
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


@dataclass(frozen=True)
class OpenAIReply:
    """How an OpenAI route answers its job: one JSON body from the whole result, or a stream."""

    respond: Callable[[Job, str, GenerationResult], BaseModel]
    stream: Callable[[Job, str], AsyncIterator[str]]


async def answer(
    request: Request,
    serving: Serving,
    body: OpenAIRequest,
    prompt: str | list[int],
    sampling: SamplingOptions,
    reply: OpenAIReply,
    *,
    logprobs_field: str | None = None,
    echo: bool = False,
) -> BaseModel | Response:
    """The OpenAI routes' one way from a body to a reply (or a dry run's): `model` picks the
    strategy when it names a preset, and is echoed."""
    model, strategy = serving.models.resolve(body.model, body.strategy)
    draft = JobDraft(prompt, documents_of(body.context), sampling, strategy, body.deadline_s, body.priority)
    await serving.models.check_same_strategy(serving.service, body.model, body.strategy, draft)
    asked, service = RouteRequest(draft, logprobs_field, echo), serving.service
    if body.dry_run:
        return await dry_run(service, asked, model)
    job = await prepare_job(service, asked)
    if body.stream:
        return StreamingResponse(reply.stream(job, model), media_type=SSE_MEDIA_TYPE, headers=SSE_HEADERS)
    result = await until_disconnect(request, collect(service.run(job)))
    return await built_reply(lambda: reply.respond(job, model, result), result)


def include_usage(body: OpenAIRequest) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


@router.get("/models", response_model=ModelList)
async def models(served: ServedModels = Depends(get_served_models)) -> ModelList:
    """The served model and the strategy presets a request selects by its `model`."""
    return ModelList(data=served.cards())


@router.post("/completions", response_model=CompletionResponse | DryRunResponse, responses={**ERRORS, **STREAM_TOO})
async def completions(
    request: Request, body: CompletionRequest, serving: Serving = Depends(get_serving)
) -> BaseModel | Response:
    prompt = body.prompt_value()
    # A token-id prompt is bounded by the body's size and the strategy's token limit, not by characters.
    sampling = openai_sampling(body, serving.settings, prompt if isinstance(prompt, str) else "")
    reply = OpenAIReply(
        respond=lambda job, model, result: _completion(job, body, model, result),
        stream=lambda job, model: _stream(serving.service, job, body, model),
    )
    logprobs_field = None if body.logprobs is None else "logprobs"
    return await answer(request, serving, body, prompt, sampling, reply, logprobs_field=logprobs_field, echo=body.echo)


def _completion(job: Job, body: CompletionRequest, model: str, result: GenerationResult) -> CompletionResponse:
    generated = [] if body.max_tokens == 0 else result.tokens
    text = "" if body.max_tokens == 0 else result.text
    tokens = generated
    if body.echo:
        # The echoed prompt: the text the model reads (documents, blank line, prompt).
        text = job.request.plain_prompt() + text
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


async def _stream(service: GenerationService, job: Job, body: CompletionRequest, model: str) -> AsyncIterator[str]:
    created = int(time.time())
    prompt_text = job.request.plain_prompt()
    result = GenerationResult()
    offset = 0
    echo_pending = body.echo

    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        body = CompletionResponse(
            id=f"cmpl-{job.request_id}", created=created, model=model, choices=choices, usage=usage
        )
        data = body.model_dump(mode="json")
        return sse_event({k: v for k, v in data.items() if v is not None})

    async def _event(tokens: list[TokenEvent], offset: int, text: str, reason: Literal["length", "stop"] | None) -> str:
        def event() -> str:
            logprobs = completion_logprobs(tokens, offset) if body.logprobs is not None else None
            return chunk([CompletionChoice(text=text, finish_reason=reason, logprobs=logprobs)])

        # The echoed prompt's logprobs come in one event: made off the event loop when large.
        return await asyncio.to_thread(event) if logprob_entries(tokens) >= ENTRIES_IN_THREAD else event()

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
                yield await _event(tokens, offset, text, reason)
                offset += sum(len(t.text) for t in tokens)
        if include_usage(body):
            yield chunk([], usage(job, 0 if body.max_tokens == 0 else len(result.tokens)))
    except Exception as exc:  # noqa: BLE001 - the status line is gone: report in-band, as vLLM does
        err = as_api_error(exc)
        yield sse_event(error_body(err.message, err.error_type))
    yield sse_event("[DONE]")
