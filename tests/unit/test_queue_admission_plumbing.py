"""Admission by queued work as the server wires it: the setting, the 429 with Retry-After on every
generation route, `priority` on the bodies and on the engine rows, the metrics, what the engine's
steps teach it, the reset on an engine restart, and every engine death as a 503.

The HTTP tests run on the fake engine (plumbing only); the real engine's burst is
tests/e2e/test_queue_admission.py."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from server.app import create_app
from server.engines.base import EngineDown, EngineIteration, RowRequest, StepStream, StepWork
from server.engines.vllm_config import VllmEngineConfig
from server.engines.vllm_stats import iteration_from_vllm, step_from_vllm
from server.http.errors import as_api_error
from server.ops.watchdog import watch_engine
from server.plan import ModelFacts
from server.service.admission import AdmissionController, RequestWork, Throughput
from server.service.lockstep import LockstepError
from server.service.queue_admission import admission_controller, all_listeners, learning_from_steps
from server.service.refusal import Refusal
from server.settings import Settings
from tests.support.fake_engine import FakeEngine, fake_service_factory
from tests.support.metrics_text import sample_value

# --- the setting ---------------------------------------------------------------------------------


def test_the_bound_defaults_to_a_minute_and_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().max_queue_wait_s == 60
    monkeypatch.setenv("ROPESERVE_MAX_QUEUE_WAIT_S", "2.5")
    assert Settings().max_queue_wait_s == 2.5
    monkeypatch.setenv("ROPESERVE_MAX_QUEUE_WAIT_S", "0")
    assert Settings().max_queue_wait_s == 0


@pytest.mark.parametrize("value", ["-1", "1e9", "soon"])
def test_a_bad_bound_stops_the_server(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("ROPESERVE_MAX_QUEUE_WAIT_S", value)
    with pytest.raises(ValidationError, match="max_queue_wait_s"):
        Settings()


def test_the_controller_follows_the_engine_settings() -> None:
    admission = admission_controller(Settings(max_queue_wait_s=5, max_num_seqs=3, max_num_batched_tokens=512))
    assert (admission.max_queue_wait_s, admission.max_rows, admission.step_prefill_tokens) == (5, 3, 512)
    assert admission_controller(Settings()).step_prefill_tokens == 2048
    assert admission_controller(Settings()).prefill_lanes == 2  # 2048-token steps, 1024-token chunks
    assert admission_controller(Settings(max_num_batched_tokens=512, long_prefill_tokens=512)).prefill_lanes == 1
    assert admission_controller(Settings(long_prefill_tokens=0)).prefill_lanes == 0


# --- 429 with Retry-After (fake engine: plumbing) ------------------------------------------------


def slow_admission(bound: float = 1.0) -> AdmissionController:
    """10 prompt tokens/s: a 50-byte prompt (the fake engine's tokens are bytes) is 5 s of prefill."""
    return AdmissionController(bound, Throughput(prefill_per_s=10, decode_per_s=10))


def client_with(admission: AdmissionController, delay: float = 0.6) -> TestClient:
    return TestClient(create_app(Settings(), fake_service_factory(delay, admission=admission)))


def in_background(client: TestClient, path: str, body: dict[str, object]) -> tuple[threading.Thread, list[int]]:
    statuses: list[int] = []
    worker = threading.Thread(target=lambda: statuses.append(client.post(path, json=body).status_code))
    worker.start()
    deadline = time.monotonic() + 5
    while not len(client.app.state.service.admission.queue) and time.monotonic() < deadline:  # type: ignore[attr-defined]
        time.sleep(0.01)
    return worker, statuses


DOCUMENT = {"inputs": "d" * 50, "parameters": {"max_new_tokens": 2}}
SHORT = {"inputs": "hi", "parameters": {"max_new_tokens": 1}}


@pytest.mark.parametrize("route", ["/generate", "/generate_stream", "/v1/completions"])
def test_a_request_behind_too_much_work_gets_429_with_retry_after(route: str) -> None:
    short = SHORT if route != "/v1/completions" else {"prompt": "hi", "max_tokens": 1}
    with client_with(slow_admission()) as client:
        worker, statuses = in_background(client, "/generate", DOCUMENT)
        refused = client.post(route, json=short)
        worker.join()
        assert refused.status_code == 429, refused.text
        # 50 tokens at 10/s ahead: 5 s against a bound of 1 s; the backlog drains to it in 4 s.
        assert refused.headers["retry-after"] == "4"
        error = refused.json()
        assert error["error_type"] == "overloaded"
        assert "about 5 s" in error["error"] and "1 s" in error["error"] and "max_queue_wait_s" in error["error"]
        assert statuses == [200]
        # The document done, nothing is queued: the same request is served.
        assert client.post(route, json=short).status_code == 200


def test_refusals_and_the_estimate_are_in_the_metrics() -> None:
    with client_with(slow_admission()) as client:
        worker, _ = in_background(client, "/generate", DOCUMENT)
        busy = client.get("/metrics").text
        assert client.post("/generate", json=SHORT).status_code == 429
        worker.join()
        after = client.get("/metrics").text
    assert sample_value(busy, "ropeserve_admission_estimated_wait_seconds") == pytest.approx(5.0)
    assert sample_value(busy, "ropeserve_admission_queued_prompt_tokens") == 50
    assert sample_value(busy, "ropeserve_admission_tokens_per_second", phase="prefill") == pytest.approx(10)
    assert sample_value(after, "ropeserve_requests_refused_total", reason="prefill_backlog") == 1
    assert sample_value(after, "ropeserve_requests_refused_total", reason="max_concurrent_requests") == 0
    assert sample_value(after, "ropeserve_admission_estimated_wait_seconds") == 0
    assert sample_value(after, "ropeserve_admission_queued_decode_tokens") == 0


def test_a_request_that_fits_is_never_refused() -> None:
    with client_with(slow_admission(bound=10)) as client:
        worker, _ = in_background(client, "/generate", DOCUMENT)
        assert client.post("/generate", json=SHORT).status_code == 200
        worker.join()


def test_bound_zero_admits_whatever_is_queued() -> None:
    with client_with(slow_admission(bound=0)) as client:
        worker, _ = in_background(client, "/generate", DOCUMENT)
        assert client.post("/generate", json=SHORT).status_code == 200
        worker.join()


def test_a_dry_run_reports_the_refusal_without_counting_it() -> None:
    with client_with(slow_admission()) as client:
        worker, _ = in_background(client, "/generate", DOCUMENT)
        report = client.post("/generate", json={**SHORT, "dry_run": True})
        worker.join()
        metrics = client.get("/metrics").text
    assert report.status_code == 200 and report.json()["admitted"] is False
    assert "max_queue_wait_s" in report.json()["refusal"]
    assert sample_value(metrics, "ropeserve_requests_refused_total", reason="prefill_backlog") == 0


def test_nothing_stays_queued_after_a_client_goes_away() -> None:
    admission = slow_admission(bound=0)
    with client_with(admission, delay=0.05) as client:
        with client.stream("POST", "/generate_stream", json={**DOCUMENT, "parameters": {"max_new_tokens": 40}}) as r:
            next(r.iter_lines())
        deadline = time.monotonic() + 5
        while len(admission.queue) and time.monotonic() < deadline:
            time.sleep(0.01)
    assert len(admission.queue) == 0


# --- priority ------------------------------------------------------------------------------------


class RecordingEngine(FakeEngine):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[RowRequest] = []

    async def generate(self, row: RowRequest) -> StepStream:
        self.rows.append(row)
        async for step in super().generate(row):
            yield step


BODIES = {
    "/generate": {"inputs": "hi", "parameters": {"max_new_tokens": 1}},
    "/generate_stream": {"inputs": "hi", "parameters": {"max_new_tokens": 1}},
    "/v1/completions": {"prompt": "hi", "max_tokens": 1},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
}


@pytest.mark.parametrize("route", BODIES)
def test_priority_reaches_the_engine_row(route: str) -> None:
    engine = RecordingEngine()
    with TestClient(create_app(Settings(), fake_service_factory(engine=engine))) as client:
        assert client.post(route, json={**BODIES[route], "priority": -3}).status_code == 200
        assert client.post(route, json=BODIES[route]).status_code == 200
    # Without one, a short prompt runs at the short requests' priority (0, ahead of documents' 1).
    assert [row.priority for row in engine.rows] == [-3, 0]


@pytest.mark.parametrize("route", BODIES)
@pytest.mark.parametrize("priority", [2**31, -(2**31) - 1, "1", 1.0, True])
def test_a_bad_priority_is_a_422_naming_it(route: str, priority: object) -> None:
    with TestClient(create_app(Settings(), fake_service_factory())) as client:
        reply = client.post(route, json={**BODIES[route], "priority": priority})
    assert reply.status_code == 422, reply.text
    assert reply.json()["error"].startswith("priority:")


# --- learning from the engine, and its restart ---------------------------------------------------


def test_vllm_step_details_become_step_work() -> None:
    details = SimpleNamespace(num_ctx_tokens=2048, num_generation_tokens=3, elapsed_ms=512.0, is_dummy=False)
    assert step_from_vllm(details) == StepWork(prefill_tokens=2048, decode_tokens=3, seconds=0.512)
    assert step_from_vllm(SimpleNamespace(**{**vars(details), "is_dummy": True})) is None
    assert step_from_vllm(None) is None
    stats = SimpleNamespace(kv_cache_usage=0.5, num_running_reqs=1, num_waiting_reqs=0, iteration_details=details)
    assert iteration_from_vllm(stats, None).step == StepWork(2048, 3, 0.512)


def test_the_engines_steps_teach_admission_and_drain_its_queue() -> None:
    admission = AdmissionController(60, Throughput(prefill_per_s=100, decode_per_s=10))
    admission.admit("doc", RequestWork(prompt_tokens=4096, new_tokens=4))
    heard: list[EngineIteration] = []
    listener = all_listeners(lambda engine, it: heard.append(it), learning_from_steps(admission))
    listener(FakeEngine(), EngineIteration(step=StepWork(prefill_tokens=2048, decode_tokens=0, seconds=1.0)))
    listener(FakeEngine(), EngineIteration())  # no step details: nothing learned
    assert len(heard) == 2
    assert admission.figures().queued_prompt_tokens == 2048
    assert admission.throughput.prefill.per_second > 100


def test_the_engine_is_started_with_priority_scheduling_and_step_details() -> None:
    from server.engines.vllm_launch import engine_args

    model = ModelFacts("m", 2048, {"rope_type": "default", "rope_theta": 10000.0}, 64, 49152)
    args = engine_args(VllmEngineConfig(model="m", max_model_len=4096), model, cpu=True)
    assert args.scheduling_policy == "priority"
    assert args.enable_logging_iteration_details is True


class DeadEngine(FakeEngine):
    alive = False


async def test_an_engine_restart_clears_the_queue() -> None:
    admission = AdmissionController(60)
    admission.admit("doc", RequestWork(prompt_tokens=4096, new_tokens=4))
    service = SimpleNamespace(engine=DeadEngine(), restarting=False, admission=admission, refresh_gauges=lambda: None)
    replacement = FakeEngine()

    async def start() -> FakeEngine:
        return replacement

    watchdog = asyncio.create_task(watch_engine(service, start, interval_s=0.01))  # type: ignore[arg-type]
    try:
        while service.engine is not replacement:
            await asyncio.sleep(0.01)
    finally:
        watchdog.cancel()
    assert len(admission.queue) == 0


# --- every engine death is a 503 -----------------------------------------------------------------


def nbce_row_failure(cause: BaseException) -> LockstepError:
    try:
        raise LockstepError(f"an nbce row failed: {cause}") from cause
    except LockstepError as exc:
        return exc


@pytest.mark.parametrize(
    "exc",
    [EngineDown("the engine died"), nbce_row_failure(EngineDown("the engine died"))],
    ids=["engine_down", "nbce_row_of_a_dead_engine"],
)
def test_an_engine_death_is_a_503_whatever_the_strategy(exc: BaseException) -> None:
    err = as_api_error(exc)
    assert (err.status, err.error_type) == (503, "generation")
    assert "engine died" in err.message


def test_other_engine_failures_stay_424_and_queue_waits_429() -> None:
    assert as_api_error(nbce_row_failure(RuntimeError("row broke"))).status == 424
    err = as_api_error(Refusal("prefill_backlog", 429, "wait", retry_after_s=7))
    assert (err.status, err.error_type, err.headers) == (429, "overloaded", {"Retry-After": "7"})
