"""FastAPI dependencies: the service and settings live on app.state, set at start-up."""

from __future__ import annotations

import hmac

from fastapi import HTTPException, Request

from server.service import GenerationService
from server.settings import Settings


def get_service(request: Request) -> GenerationService:
    service = getattr(request.app.state, "service", None)
    if service is None:
        raise HTTPException(status_code=503, detail="the engine is still starting")
    return service


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


def require_api_key(request: Request) -> None:
    keys: list[str] = request.app.state.settings.api_keys
    if not keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not any(hmac.compare_digest(token, k) for k in keys):
        raise HTTPException(
            status_code=401,
            detail="authorization: a valid 'Bearer <key>' header is required",
            headers={"WWW-Authenticate": "Bearer"},
        )
