"""The one path from a route's request to a job ready to run, or to a dry run's answer.

Every generation route (TGI, completions, chat) turns its body into a `RouteRequest` and calls
`prepare_job` (or `dry_run`): the service plans it once, the refusals that depend on the plan
follow, then the capacity check.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse

from server.http.body_checks import refuse_combined_echo, refuse_combined_logprobs
from server.http.deps import get_service, get_settings_dep
from server.http.errors import as_api_error
from server.http.presets import ServedModels, get_served_models
from server.schemas import DryRunResponse
from server.service.generation_service import GenerationService, JobDraft
from server.service.jobs import Job
from server.settings import Settings


@dataclass(frozen=True)
class Serving:
    """What a generation route works with: the service, the settings, the names it serves."""

    service: GenerationService
    settings: Settings
    models: ServedModels


def get_serving(request: Request) -> Serving:
    """The generation routes' one dependency."""
    return Serving(get_service(request), get_settings_dep(request), get_served_models(request))


@dataclass(frozen=True)
class RouteRequest:
    """A generation request as a route hands it over: the job's values, and what the route's
    reply will report beside the generated tokens (which a multi-row plan cannot give)."""

    draft: JobDraft
    # The body field that asks for per-token logprobs, when it does ("logprobs", "parameters.top_n_tokens").
    logprobs_field: str | None = None
    # The reply repeats the prompt (OpenAI's `echo`).
    echo: bool = False


async def _planned(service: GenerationService, asked: RouteRequest, count_invalid: bool) -> Job:
    job = await (service.prepare if count_invalid else service.plan_job)(asked.draft)
    refuse_combined_logprobs(job, asked.logprobs_field)
    refuse_combined_echo(job, asked.echo)
    return job


async def prepare_job(service: GenerationService, asked: RouteRequest) -> Job:
    """The job to run; raises the request's 4xx (422 invalid, 429/503 no room now)."""
    job = await _planned(service, asked, count_invalid=True)
    # Before the response starts, so that a stream is refused with a real 429 status line.
    service.check_capacity(job)
    return job


async def dry_run(service: GenerationService, asked: RouteRequest, model: str | None = None) -> JSONResponse:
    """What the request would run as, without running it (DryRunResponse): the same 422 it would
    get, else its plan, what it needs, and whether it would be admitted now. Nothing is counted or
    started; a JSON reply whatever the route (a stream too)."""
    job = await _planned(service, asked, count_invalid=False)
    refusal = service.capacity_refusal(job)
    report = DryRunResponse(
        model=model,
        strategy=job.describe(),
        rows=len(job.plan.rows),
        prompt_tokens=job.plan.prompt_tokens,
        max_new_tokens=job.sampling.max_new_tokens,
        max_total_tokens=job.plan.max_total_tokens,
        kv_tokens=job.kv_tokens_needed,
        kv_capacity_tokens=service.engine.kv_capacity_tokens,
        admitted=refusal is None,
        refusal=None if refusal is None else as_api_error(refusal).message,
    )
    return JSONResponse(report.model_dump(mode="json"))
