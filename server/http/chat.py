"""OpenAI-compatible /v1/chat/completions; `strategy`, `context` and `dry_run` are extra body
fields, and `model` may name a strategy preset (server/http/presets.py).

The messages become one prompt through the model's own chat template (the assistant's turn
opened); the `context` documents come before it, joined as on every route (docs/CONTRACT.md), so every
strategy reads `documents + "\\n\\n" + templated conversation`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel

from server.engines.base import TokenEvent
from server.http.body_checks import check_input_chars
from server.http.body_values import documents_of, openai_sampling
from server.http.errors import as_api_error, error_body, validation_error
from server.http.generation_result import GenerationResult
from server.http.guarded_route import GuardedRoute
from server.http.openai import ERRORS, LOGPROB_FLOOR, OpenAIReply, answer, finish, include_usage, logprob, usage
from server.http.preparation import Serving, get_serving
from server.http.sse import sse_event
from server.schemas import (
    STREAM_TOO,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatMessage,
    ChatResponseMessage,
    ChatTokenLogprob,
    ChatTopLogprob,
    DryRunResponse,
)
from server.service.generation_service import GenerationService
from server.service.jobs import Job

router = APIRouter(prefix="/v1", route_class=GuardedRoute)


# Conversations this large are templated off the event loop (the template runs in Python).
TEMPLATE_IN_THREAD_MESSAGES = 64
TEMPLATE_IN_THREAD_CHARS = 20_000


async def chat_prompt(
    service: GenerationService, messages: list[ChatMessage], add_generation_prompt: bool = True
) -> str:
    """The conversation through the model's chat template (by default the assistant's turn opened)."""
    turns = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]

    def templated() -> str:
        try:
            return service.tokenizer.apply_chat_template(
                turns, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as exc:  # noqa: BLE001 - a template that refuses the conversation refuses the request
            raise validation_error(f"messages: the model's chat template does not accept them ({exc})") from None

    if len(turns) >= TEMPLATE_IN_THREAD_MESSAGES or sum(len(t["content"]) for t in turns) >= TEMPLATE_IN_THREAD_CHARS:
        return await asyncio.to_thread(templated)
    return templated()


def message_texts(messages: list[ChatMessage]) -> list[str]:
    return [m.text() for m in messages]


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


@router.post(
    "/chat/completions", response_model=ChatCompletionResponse | DryRunResponse, responses={**ERRORS, **STREAM_TOO}
)
async def chat_completions(
    request: Request, body: ChatCompletionRequest, serving: Serving = Depends(get_serving)
) -> BaseModel | Response:
    # The messages' own characters first: a conversation over the limit is not templated.
    check_input_chars(serving.settings, [*message_texts(body.messages), *documents_of(body.context)], "messages")
    prompt = await chat_prompt(serving.service, body.messages)
    reply = OpenAIReply(
        respond=lambda job, model, result: _chat_completion(job, body, model, result),
        stream=lambda job, model: _stream(serving.service, job, body, model),
    )
    sampling = openai_sampling(body, serving.settings, prompt)
    return await answer(
        request, serving, body, prompt, sampling, reply, logprobs_field="logprobs" if body.logprobs else None
    )


def _chat_completion(
    job: Job, body: ChatCompletionRequest, model: str, result: GenerationResult
) -> ChatCompletionResponse:
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


async def _stream(service: GenerationService, job: Job, body: ChatCompletionRequest, model: str) -> AsyncIterator[str]:
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
        if include_usage(body):
            yield chunk([], with_usage=True)
    except Exception as exc:  # noqa: BLE001 - the status line is gone: report in-band, as vLLM does
        err = as_api_error(exc)
        yield sse_event(error_body(err.message, err.error_type))
    yield sse_event("[DONE]")
