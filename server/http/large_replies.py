"""Replies that grow with the prompt, built and rendered off the event loop.

`echo` with `logprobs: 20` answers 21 entries per prompt token (2.1 MB at 2,900 tokens), TGI's
`decoder_input_details` one per prompt token, and logprobs of a long completion as many per
generated token; built as Python objects and rendered as JSON on the event loop, they held
`/health` for over a second. Such a reply is built and rendered in a worker thread instead
(the loop runs between the thread's steps); small ones stay where they are, cheaper there.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from fastapi.responses import JSONResponse
from pydantic import BaseModel

from server.engines.base import TokenEvent
from server.http.generation_result import GenerationResult

# Logprob entries (a token, or one of its likeliest alternatives) from which a reply is built in a thread.
ENTRIES_IN_THREAD = 4096


def logprob_entries(tokens: list[TokenEvent]) -> int:
    return sum(1 + len(t.top) for t in tokens)


def is_large(result: GenerationResult) -> bool:
    return logprob_entries([*(result.prompt_logprobs or ()), *result.tokens]) >= ENTRIES_IN_THREAD


async def built_reply(
    build: Callable[[], BaseModel], result: GenerationResult, exclude_none: bool = False, listed: bool = False
) -> BaseModel | JSONResponse:
    """`build()`, or for a large result its JSON response made in a worker thread, as the route's
    response model would render it (`exclude_none` as the route sets it; `listed`: in a list, as
    TGI's `POST /` answers)."""
    if not is_large(result):
        return build()

    def rendered() -> JSONResponse:
        body = build().model_dump(mode="json", exclude_none=exclude_none)
        return JSONResponse([body] if listed else body)

    return await asyncio.to_thread(rendered)
