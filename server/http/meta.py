"""Read-only routes: /info, /health (with its readiness and liveness halves), /strategies, /metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server import __version__
from server.http.deps import get_service, get_settings_dep
from server.http.errors import error_response
from server.schemas import (
    ErrorResponse,
    HealthResponse,
    InfoResponse,
    ParallelismInfo,
    StrategiesResponse,
    StrategyInfo,
)
from server.service.generation_service import GenerationService
from server.settings import Settings

router = APIRouter()


NOT_READY: dict[int | str, dict[str, Any]] = {
    503: {
        "model": ErrorResponse,
        "description": "the engine is starting, down or restarting, or the server is draining",
    }
}


def readiness(request: Request) -> Response | None:
    """Why the server cannot take requests now (a 503), or None when it can."""
    service: GenerationService | None = getattr(request.app.state, "service", None)
    if service is None:
        return error_response(503, "the engine is still starting", "generation")
    if service.draining:
        return error_response(503, "the server is shutting down (draining requests in flight)", "generation")
    if service.restarting or not service.engine.alive:
        return error_response(503, "the engine is down and being restarted", "generation")
    return None


async def _ready(request: Request) -> HealthResponse | Response:
    if (refusal := readiness(request)) is not None:
        return refusal
    try:
        await request.app.state.service.engine.check_health()
    except Exception as exc:  # noqa: BLE001 - a dead engine core makes the server unhealthy, not the request invalid
        return error_response(503, f"engine unhealthy: {exc}", "generation")
    return HealthResponse(status="ok")


async def health(request: Request) -> HealthResponse | Response:
    """200 while the server takes requests (its engine alive, not draining); as `/health/ready`."""
    return await _ready(request)


async def health_ready(request: Request) -> HealthResponse | Response:
    """Readiness: 200 while the server takes requests; 503 while the engine starts, is down or
    restarts, and while the server drains (send no traffic; the process is fine)."""
    return await _ready(request)


async def health_live() -> HealthResponse:
    """Liveness: 200 whenever the server answers, also while its engine restarts (the watchdog's
    work) or it drains; a process that cannot answer this needs restarting."""
    return HealthResponse(status="ok")


# GET and HEAD (what load balancers and probes send), each its own operation in the OpenAPI document.
NO_ERRORS: dict[int | str, dict[str, Any]] = {}
for path, endpoint, errors in (
    ("/health", health, NOT_READY),
    ("/health/ready", health_ready, NOT_READY),
    ("/health/live", health_live, NO_ERRORS),
):
    for method in ("GET", "HEAD"):
        router.add_api_route(
            path,
            endpoint,
            methods=[method],
            response_model=HealthResponse,
            responses=errors,
            operation_id=f"{endpoint.__name__}_{method.lower()}",
        )


@router.get("/info", response_model=InfoResponse)
async def info(
    service: GenerationService = Depends(get_service), settings: Settings = Depends(get_settings_dep)
) -> InfoResponse:
    parallel = service.engine.parallelism
    return InfoResponse(
        model_id=settings.served_model_name or service.model.model_id,
        model_dtype=service.engine.dtype,
        native_context_window=service.model.native_window,
        max_total_tokens=service.model.native_window,
        max_new_tokens_limit=settings.max_new_tokens_limit,
        engine=service.engine.kind,
        default_strategy=service.default_strategy,
        max_context_tokens=service.model.max_context_tokens,
        rope_slots=service.engine.stats().rope_slots,
        head_dim=service.model.head_dim,
        parallelism=ParallelismInfo(
            tensor_parallel_size=parallel.tensor,
            pipeline_parallel_size=parallel.pipeline,
            data_parallel_size=parallel.data,
            distributed_executor_backend=parallel.backend,
            ranks=parallel.ranks,
        ),
        version=__version__,
    )


@router.get("/strategies", response_model=StrategiesResponse)
async def strategies(service: GenerationService = Depends(get_service)) -> StrategiesResponse:
    return StrategiesResponse(
        default=service.default_strategy,
        strategies=[
            StrategyInfo(
                name=cls.name,
                description=cls.description,
                parameters_schema=cls.parameters_schema(),
                engines=list(cls.engines),
            )
            for cls in service.registry.classes()
        ],
    )


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
            "description": "Prometheus text exposition",
        }
    },
)
async def metrics(service: GenerationService = Depends(get_service)) -> Response:
    service.refresh_gauges()
    return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)
