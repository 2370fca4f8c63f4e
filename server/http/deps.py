"""FastAPI dependencies: the service and settings live on app.state, set at start-up."""

from __future__ import annotations

from fastapi import HTTPException, Request

from server.service.generation_service import GenerationService
from server.settings import Settings


def get_service(request: Request) -> GenerationService:
    service = getattr(request.app.state, "service", None)
    if service is None:
        raise HTTPException(status_code=503, detail="the engine is still starting")
    return service


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings
