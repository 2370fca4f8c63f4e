"""Every error leaves as `{"error", "error_type"}` with a 4xx status when the client is at fault."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.engines.base import EngineBusy, EngineDown
from server.http.sse import ClientDisconnected
from server.plan import MAX_REPORTED_ERRORS, StrategyError, clipped
from server.schemas import ErrorResponse, ErrorType
from server.service.jobs import DeadlineExceeded
from server.service.refusal import Refusal

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, message: str, error_type: ErrorType, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        # Headers the response carries (a queue-wait 429's Retry-After).
        self.headers = headers or {}


def validation_error(message: str) -> ApiError:
    return ApiError(422, message, "validation")


# Seconds a refused client should wait before retrying (429): one engine step is well below it.
RETRY_AFTER_SECONDS = 1


def error_body(message: str, error_type: ErrorType) -> dict[str, Any]:
    # A message may quote client input; unpaired surrogates in it cannot be encoded as UTF-8.
    safe = message.encode("utf-8", "replace").decode("utf-8")
    return ErrorResponse(error=safe, error_type=error_type).model_dump()


def error_response(
    status: int, message: str, error_type: ErrorType, headers: dict[str, str] | None = None
) -> JSONResponse:
    headers = dict(headers or {})
    if status == 429:
        headers.setdefault("Retry-After", str(RETRY_AFTER_SECONDS))
    return JSONResponse(status_code=status, content=error_body(message, error_type), headers=headers or None)


_UNION_TAGS = {"str", "int", "float", "bool", "none"}
# Characters of one error line at most: a field path or message may quote client input.
MAX_ERROR_CHARS = 300


def describe_validation_errors(errors: list[dict[str, Any]]) -> str:
    """One line per error ("field: what is wrong"), the first MAX_REPORTED_ERRORS and a count."""
    parts = []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        # pydantic reports the union branch it tried (e.g. "str", "list[str]"); the field is enough.
        loc = [p for p in loc if p not in _UNION_TAGS and not p.startswith(("list[", "dict[", "function-"))]
        where = ".".join(loc) or "body"
        msg = err.get("msg", "invalid")
        if err.get("type") == "value_error":
            msg = msg.removeprefix("Value error, ")
            # A whole-body check names its own field ("max_tokens: ..."): no "body: " before it.
            if where == "body" and ": " in msg and msg.split(": ", 1)[0].replace("_", "").isalnum():
                where, msg = msg.split(": ", 1)
        if err.get("type") == "json_invalid":
            where, msg = "body", f"malformed JSON ({err.get('ctx', {}).get('error', 'parse error')})"
        parts.append(clipped(f"{where}: {msg}", MAX_ERROR_CHARS))
    distinct = list(dict.fromkeys(parts))
    shown = "; ".join(distinct[:MAX_REPORTED_ERRORS])
    more = len(distinct) - MAX_REPORTED_ERRORS
    return shown + (f"; and {more} more errors" if more > 0 else "")


def as_api_error(exc: BaseException) -> ApiError:
    """Map a domain exception to its HTTP meaning (also used inside SSE streams)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, StrategyError):
        return validation_error(exc.message)
    if isinstance(exc, ClientDisconnected):
        return ApiError(499, "the client closed the connection", "generation")
    if isinstance(exc, Refusal):
        return refusal_error(exc)
    if isinstance(exc, EngineBusy):  # a row the engine could not take after admission: the same 429
        return ApiError(429, str(exc), "overloaded")
    if isinstance(exc, DeadlineExceeded):
        return ApiError(408, str(exc), "generation")
    if (down := engine_death(exc)) is not None:
        return ApiError(503, str(down), "generation")
    log.error("generation failed", exc_info=exc)
    # TGI answers engine failures with 424 (the request was fine; the backend failed).
    return ApiError(424, f"generation failed: {type(exc).__name__}: {exc}", "generation")


def refusal_error(refusal: Refusal) -> ApiError:
    """A 429 is `overloaded` (retry this server later), a 503 `generation` (it cannot serve now)."""
    retry = {} if refusal.retry_after_s is None else {"Retry-After": str(refusal.retry_after_s)}
    return ApiError(refusal.status, refusal.message, "overloaded" if refusal.status == 429 else "generation", retry)


def engine_death(exc: BaseException) -> EngineDown | None:
    """The engine's death behind `exc`: itself, or what it was raised from (a strategy's runner that
    wraps a failed row, e.g. NBCE's); None when the engine did not die."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, EngineDown):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, describe_validation_errors(list(exc.errors())), "validation")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        error_type: ErrorType = "unauthorized" if exc.status_code == 401 else "validation"
        if exc.status_code == 503:
            error_type = "generation"
        if exc.status_code == 400:  # FastAPI's "error parsing the body" (e.g. not UTF-8): invalid input
            return error_response(422, f"body: malformed request body ({exc.detail})", "validation")
        # Starlette's own headers (405's `Allow`, 401's `WWW-Authenticate`) go out with the error.
        return error_response(exc.status_code, str(exc.detail), error_type, dict(exc.headers or {}))

    async def _domain(_: Request, exc: Exception) -> JSONResponse:
        err = as_api_error(exc)
        return error_response(err.status, err.message, err.error_type, err.headers)

    # Expected errors get their own handlers: Starlette's catch-all for Exception also re-raises
    # into the server log as a crash, which these are not.
    for expected in (
        ApiError,
        StrategyError,
        Refusal,
        EngineBusy,
        EngineDown,
        DeadlineExceeded,
        ClientDisconnected,
    ):
        app.add_exception_handler(expected, _domain)
    app.add_exception_handler(Exception, _domain)
