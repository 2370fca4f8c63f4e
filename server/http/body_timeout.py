"""Answer 408 when a request's body does not arrive in time.

uvicorn bounds the wait between requests on a connection (`timeout_keep_alive`), not the wait for
a body: a client that sends its headers and part of its body would hold the connection and the
route's task for as long as it likes. The time runs from the request's start (its headers
arrived) until its body is complete; a route that is still reading then gets a 408, and the
connection closes with the reply (`Connection: close`: the unread rest cannot be told from a next
request). What comes
after the body (waiting for the client to disconnect while a reply streams) is not bounded.
"""

from __future__ import annotations

import asyncio

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


def _too_slow(seconds: float) -> str:
    return (
        f"body: the request body did not arrive within {seconds:g} s of its headers, this server's limit "
        "(ROPESERVE_BODY_TIMEOUT_S)"
    )


class BodyTimeout(HTTPException):
    def __init__(self, seconds: float) -> None:
        # The rest of the body may still come: the connection cannot carry another request.
        super().__init__(408, _too_slow(seconds), headers={"Connection": "close"})


class BodyTimeoutMiddleware:
    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.seconds
        complete = False

        async def timed() -> Message:
            nonlocal complete
            if complete:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
            except TimeoutError:
                raise BodyTimeout(self.seconds) from None
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, timed, send)
