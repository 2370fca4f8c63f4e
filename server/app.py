"""The FastAPI application: routes, error handlers, and the engine's life cycle."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from server import __version__
from server.http.api_keys import key_bytes
from server.http.body_limit import BodyLimitMiddleware
from server.http.body_timeout import BodyTimeoutMiddleware
from server.http.chat import router as chat_router
from server.http.errors import install_error_handlers
from server.http.meta import router as meta_router
from server.http.openai import router as openai_router
from server.http.presets import UnknownModel, parse_presets, served_models, unknown_model_handler
from server.http.slash_redirect import SlashRedirect
from server.http.tgi import router as tgi_router
from server.http.tokenize import document_tokenize_bodies
from server.http.tokenize import router as tokenize_router
from server.ops.gc_heap import freeze_startup_heap
from server.service.generation_service import GenerationService
from server.settings import Settings

log = logging.getLogger(__name__)

ServiceFactory = Callable[[Settings], Awaitable[GenerationService]]


def create_app(settings: Settings, service_factory: ServiceFactory | None = None) -> FastAPI:
    """`service_factory` builds the engines at start-up; the default starts vLLM."""
    if service_factory is None:
        from server.bootstrap import build_vllm_service

        service_factory = build_vllm_service

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        parse_presets(settings.presets)  # a mistake there stops the server before the engine starts
        service = await service_factory(settings)
        watchdog: asyncio.Task[None] | None = None
        try:
            app.state.models = await served_models(settings, service)
            app.state.service = service
            freeze_startup_heap()
            watchdog = asyncio.create_task(service.watch_engine())
            yield
        finally:
            if watchdog is not None:
                watchdog.cancel()
            app.state.service = None
            app.state.models = None
            service.engine.shutdown()

    app = FastAPI(title="ropeserve", version=__version__, lifespan=lifespan)
    app.state.settings = settings
    # Compared as bytes with the header's (server/http/api_keys.py), by the routes that take keys.
    app.state.api_key_bytes = key_bytes(settings.api_keys)
    app.state.service = None
    app.state.models = None
    install_error_handlers(app)
    app.add_exception_handler(UnknownModel, unknown_model_handler)
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes)
    app.add_middleware(BodyTimeoutMiddleware, seconds=settings.body_timeout_s)
    # Starlette's own redirect builds its Location from the Host header.
    app.router.redirect_slashes = False
    app.add_middleware(SlashRedirect, router=app.router)
    app.include_router(meta_router)
    app.include_router(tgi_router)
    app.include_router(openai_router)
    app.include_router(chat_router)
    app.include_router(tokenize_router)
    document_tokenize_bodies(app)
    return app
