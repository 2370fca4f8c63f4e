"""Admission by queued work (server/service/admission.py) as the service uses it: a job's work as the
controller counts it, a refusal as the 429 the client gets, the controller built from the settings,
and the engine's steps it learns its throughput from."""

from __future__ import annotations

from server.engines.base import Engine, EngineIteration, StatsListener
from server.service.admission import DEFAULT_STEP_PREFILL_TOKENS, AdmissionController, Admit, RequestWork
from server.service.jobs import Job
from server.service.refusal import Refusal
from server.settings import Settings


def job_work(job: Job) -> RequestWork:
    """What `job` asks of the engine: every row's prompt, and `max_new_tokens` for each row."""
    return RequestWork(
        prompt_tokens=job.plan.prompt_tokens,
        new_tokens=job.sampling.max_new_tokens,
        rows=len(job.plan.rows),
        priority=job.priority,
    )


def queue_refusal(admission: AdmissionController, job: Job) -> Refusal | None:
    """The 429 for `job` when the work queued ahead of it would keep it waiting past the bound;
    None when it fits (nothing is tracked: the service admits it when it starts)."""
    decision = admission.decide(job_work(job))
    if isinstance(decision, Admit):
        return None
    return Refusal(
        decision.reason,
        429,
        f"the work queued ahead of this request would keep it waiting about {decision.estimated_wait_s:.0f} s "
        f"({decision.reason.replace('_', ' ')}), past the server's bound of {admission.max_queue_wait_s:g} s "
        f"(max_queue_wait_s); retry after {decision.retry_after_s} s",
        decision.retry_after_s,
    )


def admission_controller(settings: Settings) -> AdmissionController:
    """The controller for an engine run with `settings`: its step's prefill budget and row slots."""
    return AdmissionController(
        settings.max_queue_wait_s,
        step_prefill_tokens=settings.max_num_batched_tokens or DEFAULT_STEP_PREFILL_TOKENS,
        max_rows=settings.max_num_seqs,
        prefill_lanes=prefill_lanes(settings),
    )


def prefill_lanes(settings: Settings) -> int:
    """How many capped prefills one engine step holds (0: uncapped, one prefill holds every step)."""
    if settings.long_prefill_tokens <= 0:
        return 0
    budget = settings.max_num_batched_tokens or DEFAULT_STEP_PREFILL_TOKENS
    return max(1, budget // settings.long_prefill_tokens)


def learning_from_steps(admission: AdmissionController) -> StatsListener:
    """A stats listener that teaches `admission` each engine step's throughput (and drains the
    prefill it computed off the tracked requests)."""

    def listen(engine: Engine, iteration: EngineIteration) -> None:
        if (step := iteration.step) is not None:
            admission.observe_iteration(step.prefill_tokens, step.decode_tokens, step.seconds)

    return listen


def all_listeners(*listeners: StatsListener) -> StatsListener:
    """One stats listener that tells each of `listeners` in turn."""

    def listen(engine: Engine, iteration: EngineIteration) -> None:
        for listener in listeners:
            listener(engine, iteration)

    return listen
