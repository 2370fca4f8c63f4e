"""OpenAI-compatible /v1/chat/completions; `strategy` and `context` are extra body fields.

The messages become one prompt through the model's own chat template (the assistant's turn
opened); the `context` documents come before it, joined as on every route (docs/CONTRACT.md), so every
strategy reads `documents + "\\n\\n" + templated conversation`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from server.deps import get_service, get_settings_dep, require_api_key
from server.engines.base import TokenEvent
from server.errors import as_api_error, error_body, validation_error
from server.generation import collect, documents_of, openai_sampling, refuse_combined_logprobs
from server.http_openai import ERRORS, LOGPROB_FLOOR, finish, logprob, served_model, usage
from server.schemas import (
    STREAM_TOO,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatResponseMessage,
    ChatTokenLogprob,
    ChatTopLogprob,
)
from server.service import GenerationService, Job
from server.settings import Settings
from server.sse import SSE_HEADERS, SSE_MEDIA_TYPE, sse_event, until_disconnect

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


def chat_prompt(service: GenerationService, body: ChatCompletionRequest) -> str:
    """The conversation through the model's chat template, the assistant's turn opened."""
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    try:
        return service.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # noqa: BLE001 - a template that refuses the conversation refuses the request
        raise validation_error(f"messages: the model's chat template does not accept them ({exc})") from None


def chat_logprobs(tokens: list[TokenEvent], top: int) -> ChatLogprobs:
    """OpenAI's chat logprobs: each token, its logprob and bytes, and the `top` likeliest."""

    def entry(text: str, value: float) -> ChatTopLogprob:
        return ChatTopLogprob(token=text, logprob=logprob(value), bytes=list(text.encode()))

    content = []
    for t in tokens:
        ranked = sorted(t.top, key=lambda x: x.logprob, reverse=True)[:top]
        head = entry(t.text, t.logprob if t.logprob is not None else LOGPROB_FLOOR)
        content.append(ChatTokenLogprob(**head.model_dump(), top_logprobs=[entry(x.text, x.logprob) for x in ranked]))
    return ChatLogprobs(content=content)


async def _prepare(body: ChatCompletionRequest, service: GenerationService, settings: Settings) -> Job:
    prompt = chat_prompt(service, body)
    sampling = openai_sampling(body, settings, prompt)
    job = await service.prepare(prompt, documents_of(body.context), sampling, body.strategy, body.deadline_s)
    refuse_combined_logprobs(job, body.logprobs)
    service.check_capacity(job)
    return job


@router.post("/chat/completions", response_model=ChatCompletionResponse, responses={**ERRORS, **STREAM_TOO})
async def chat_completions(
    request: Request,
    body: ChatCompletionRequest,
    service: GenerationService = Depends(get_service),
    settings: Settings = Depends(get_settings_dep),
) -> ChatCompletionResponse | StreamingResponse:
    model = served_model(service, settings, body.model)
    job = await _prepare(body, service, settings)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _stream(service, job, body, model, include_usage)
        return StreamingResponse(events, media_type=SSE_MEDIA_TYPE, headers=SSE_HEADERS)
    result = await until_disconnect(request, collect(service.run(job)))
    choice = ChatChoice(
        message=ChatResponseMessage(content=result.text),
        finish_reason=finish(result.finish_reason),
        logprobs=chat_logprobs(result.tokens, body.top_logprobs or 0) if body.logprobs else None,
    )
    return ChatCompletionResponse(
        id=f"chatcmpl-{job.request_id}",
        created=int(time.time()),
        model=model,
        choices=[choice],
        usage=usage(job, len(result.tokens)),
        strategy=job.describe(),
    )


async def _stream(
    service: GenerationService, job: Job, body: ChatCompletionRequest, model: str, include_usage: bool
) -> AsyncIterator[str]:
    created = int(time.time())
    generated = 0

    def chunk(choices: list[ChatChunkChoice], with_usage: bool = False) -> str:
        data = ChatCompletionChunk(
            id=f"chatcmpl-{job.request_id}",
            created=created,
            model=model,
            choices=choices,
            usage=usage(job, generated) if with_usage else None,
        ).model_dump(mode="json")
        return sse_event({k: v for k, v in data.items() if v is not None or k == "usage" and with_usage})

    try:
        yield chunk([ChatChunkChoice(delta=ChatDelta(role="assistant", content=""))])
        async for step in service.run(job):
            generated += len(step.tokens)
            logprobs = chat_logprobs(step.tokens, body.top_logprobs or 0) if body.logprobs and step.tokens else None
            if step.text or logprobs:
                yield chunk([ChatChunkChoice(delta=ChatDelta(content=step.text), logprobs=logprobs)])
            if step.finished:
                yield chunk([ChatChunkChoice(delta=ChatDelta(), finish_reason=finish(step.finish_reason))])
        if include_usage:
            yield chunk([], with_usage=True)
    except Exception as exc:  # noqa: BLE001 - the status line is gone: report in-band, as vLLM does
        err = as_api_error(exc)
        yield sse_event(error_body(err.message, err.error_type))
    yield sse_event("[DONE]")
