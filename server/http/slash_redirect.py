"""A path with a trailing slash redirects to the route without it, by a relative `Location`.

Starlette's own redirect (`redirect_slashes`) writes an absolute URL built from the request's
`Host` header, so `Host: evil.example` sent `/generate/` to `http://evil.example/generate`. This
one answers `307` with the path alone (and the query), which a client resolves against the URL
it asked for, whatever Host it sent. A path no route takes without its slash, or one that would
read as another host's (`//host`), is left to the app's 404.
"""

from __future__ import annotations

from starlette.responses import Response
from starlette.routing import Match, Router
from starlette.types import ASGIApp, Receive, Scope, Send


class SlashRedirect:
    def __init__(self, app: ASGIApp, router: Router) -> None:
        self.app = app
        self.router = router

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (location := self._location(scope)) is not None:
            await Response(status_code=307, headers={"location": location})(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _location(self, scope: Scope) -> str | None:
        path: str = scope.get("path", "")
        if scope["type"] != "http" or len(path) < 2 or not path.endswith("/"):
            return None
        bare = path.rstrip("/")
        if not bare.startswith("/") or bare.startswith("//"):
            return None
        if all(route.matches({**scope, "path": bare})[0] == Match.NONE for route in self.router.routes):
            return None
        raw: bytes = scope.get("raw_path") or path.encode()
        query: bytes = scope.get("query_string", b"")
        return (raw.rstrip(b"/") + (b"?" + query if query else b"")).decode("latin-1")
