"""The route class of every route that takes a body or needs a key: headers first, then the body.

FastAPI reads and parses a body before it runs a route's dependencies, so a key checked there
came after the body: an unauthenticated 30 MB body cost its parse, and malformed JSON got a 422
before the 401. Routes of this class check the key from the headers alone, before a byte of the
body is read, and parse a JSON body only after measuring it (server/http/json_body.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from server.http.api_keys import authorized, unauthorized
from server.http.json_body import parse_json_body
from server.settings import MAX_JSON_ITEMS

# Bodies this large are measured and parsed in a worker thread: the byte passes and the parser
# still hold the interpreter while each runs, but the event loop runs between them (a 30 MB body
# takes up to 0.4 s in all, no single pass over 0.1 s).
PARSE_IN_THREAD_BYTES = 1 << 20


class MeasuredRequest(Request):
    """A request whose JSON body is measured before it is parsed."""

    _parsed: Any

    async def json(self) -> Any:
        if not hasattr(self, "_parsed"):
            settings = getattr(self.app.state, "settings", None)
            max_items = getattr(settings, "max_json_items", MAX_JSON_ITEMS)
            body = await self.body()
            if len(body) >= PARSE_IN_THREAD_BYTES:
                self._parsed = await asyncio.to_thread(parse_json_body, body, max_items)
            else:
                self._parsed = parse_json_body(body, max_items)
        return self._parsed


class GuardedRoute(APIRoute):
    """Keys (the app's `api_key_bytes`, none: open) from the headers, then the measured body."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            keys: list[bytes] = getattr(request.app.state, "api_key_bytes", [])
            if keys and not authorized(request.scope["headers"], keys):
                raise unauthorized()
            return await handler(MeasuredRequest(request.scope, request.receive))

        return guarded
