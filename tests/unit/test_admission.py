"""Admission by queued work (server/service/admission.py): the estimate, the refusals and their
Retry-After, what the estimator learns from the engine's iterations. Pure arithmetic, no engine."""

from __future__ import annotations

import doctest
import math

import pytest

from server.service import admission
from server.service.admission import (
    AdmissionController,
    Admit,
    Backlog,
    DecayedRate,
    Refuse,
    RequestWork,
    Throughput,
    default_priority,
    estimate_wait,
    retry_after_s,
)

PREFILL, DECODE = 100.0, 10.0


def controller(bound: float = 60.0, **kwargs: object) -> AdmissionController:
    # A prior worth a long time, so steps the test reports do not move the rates unless it means to.
    rates = Throughput(prefill_per_s=PREFILL, decode_per_s=DECODE, prior_weight_s=1e9)
    return AdmissionController(bound, throughput=rates, **kwargs)  # type: ignore[arg-type]


def long_doc(tokens: int = 10_000, new: int = 16, rows: int = 1) -> RequestWork:
    return RequestWork(prompt_tokens=tokens, new_tokens=new, rows=rows, priority=default_priority(tokens))


def test_the_module_example_runs() -> None:
    assert doctest.testmod(admission).failed == 0


@pytest.mark.parametrize(
    "work",
    [
        RequestWork(prompt_tokens=120_000, new_tokens=4096),
        RequestWork(prompt_tokens=64 * 8000, new_tokens=4096, rows=64),
        RequestWork(prompt_tokens=0, new_tokens=1),
    ],
)
def test_an_empty_queue_never_refuses_whatever_the_size(work: RequestWork) -> None:
    tight = controller(bound=0.001, max_rows=8)
    assert tight.try_admit("only", work) == Admit(0.0)


def test_the_estimate_grows_with_queued_work() -> None:
    admission_ = controller(bound=1e9)
    waits = []
    for i in range(5):
        waits.append(admission_.estimated_wait_s(long_doc())[0])
        assert isinstance(admission_.try_admit(f"r{i}", long_doc()), Admit)
    assert waits == sorted(waits) and len(set(waits)) == len(waits)
    assert waits[1] == pytest.approx(10_000 / PREFILL)
    assert waits[4] == pytest.approx(4 * 10_000 / PREFILL)


def test_refused_past_the_bound_with_a_retry_after_from_the_arithmetic() -> None:
    admission_ = controller(bound=30)
    assert isinstance(admission_.try_admit("first", long_doc(10_000)), Admit)
    decision = admission_.try_admit("second", long_doc(10_000))
    # 10,000 prompt tokens ahead at 100 tokens/s: 100 s; it passes 30 s after 70 s of draining.
    assert decision == Refuse(retry_after_s=70, reason="prefill_backlog", estimated_wait_s=100.0)
    assert admission_.figures().refusals == {"prefill_backlog": 1, "rows_full": 0}
    assert len(admission_.queue) == 1  # the refused one is not tracked


def test_decoding_rows_slow_every_step_of_the_prefill_ahead() -> None:
    admission_ = controller(bound=1e9)
    admission_.try_admit("chat", RequestWork(prompt_tokens=100, new_tokens=500, rows=4))
    admission_.first_token("chat")  # 4 rows decoding: each step costs 4 / 10 s more
    admission_.try_admit("doc", long_doc(5000))
    wait, reason = admission_.estimated_wait_s(long_doc(5000))
    steps = math.ceil(5000 / admission.DEFAULT_STEP_PREFILL_TOKENS)
    assert reason == "prefill_backlog"
    assert wait == pytest.approx(5000 / PREFILL + steps * 4 / DECODE)


def test_a_retry_after_is_whole_seconds_and_at_least_one() -> None:
    assert retry_after_s(30.2, 30) == 1
    assert retry_after_s(30.0000001, 30) == 1
    assert retry_after_s(91.0, 30) == 61
    assert retry_after_s(91.4, 30) == 62


def test_a_short_request_waits_one_step_behind_a_long_document() -> None:
    admission_ = controller(bound=60)
    assert isinstance(admission_.try_admit("doc", long_doc(24_000)), Admit)
    assert isinstance(admission_.try_admit("doc2", long_doc(24_000)), Refuse)
    hi = RequestWork(prompt_tokens=12, new_tokens=8, priority=default_priority(12))
    decision = admission_.try_admit("hi", hi)
    # Only the step it shares with the document's chunk: 2048 tokens at 100/s.
    assert decision == Admit(round(admission.DEFAULT_STEP_PREFILL_TOKENS / PREFILL, 3))


def test_without_a_prefill_cap_a_short_request_waits_for_the_whole_document() -> None:
    """ROPESERVE_LONG_PREFILL_TOKENS=0: a started prefill takes every step's budget until it is
    done (measured: shorts waited out a 24k prefill whatever their priority), so it counts in full."""
    admission_ = controller(bound=60, prefill_lanes=0)
    assert isinstance(admission_.try_admit("doc", long_doc(24_000)), Admit)
    hi = RequestWork(prompt_tokens=12, new_tokens=8, priority=default_priority(12))
    decision = admission_.decide(hi)
    assert isinstance(decision, Refuse) and decision.estimated_wait_s >= 24_000 / PREFILL


def test_capped_prefills_share_a_step_so_one_behind_fewer_than_the_lanes_starts_next_step() -> None:
    """vLLM serves running prefills first, each capped at long_prefill_token_threshold, then the
    waiting queue with what is left of the step: two lanes when the cap is half the step's budget.
    Measured: every request at priority 0, a "Hi" behind a started 24k document waited 9-15 s."""
    step = admission.DEFAULT_STEP_PREFILL_TOKENS
    fcfs = RequestWork(prompt_tokens=12, new_tokens=8, priority=admission.LONG_REQUEST_PRIORITY)
    two_lanes = controller(bound=60, prefill_lanes=2)
    assert isinstance(
        two_lanes.try_admit("doc", RequestWork(24_000, 16, priority=admission.LONG_REQUEST_PRIORITY)), Admit
    )
    assert two_lanes.decide(fcfs) == Admit(round(step / PREFILL, 3))
    assert isinstance(
        two_lanes.try_admit("doc2", RequestWork(24_000, 16, priority=admission.LONG_REQUEST_PRIORITY)), Admit
    )
    assert isinstance(two_lanes.decide(fcfs), Refuse)  # both lanes taken: it waits for one of them
    one_lane = controller(bound=60, prefill_lanes=1)
    assert isinstance(
        one_lane.try_admit("doc", RequestWork(24_000, 16, priority=admission.LONG_REQUEST_PRIORITY)), Admit
    )
    assert isinstance(one_lane.decide(fcfs), Refuse)


def test_default_priority_puts_short_before_long_unless_the_client_says() -> None:
    assert default_priority(511) < default_priority(512)
    assert default_priority(100_000, requested=-3) == -3
    assert default_priority(10, requested=7) == 7
    assert default_priority(600, threshold=1000) == admission.SHORT_REQUEST_PRIORITY


def test_full_rows_wait_for_the_row_with_the_least_decode_left() -> None:
    admission_ = controller(bound=1, max_rows=4)
    for i, left in enumerate((40, 5, 20, 10)):
        admission_.try_admit(f"r{i}", RequestWork(prompt_tokens=10, new_tokens=left))
        admission_.first_token(f"r{i}")
    decision = admission_.decide(RequestWork(prompt_tokens=10, new_tokens=4))
    # One row short: the one with 5 tokens left frees it after 5 steps of 4 rows at 10 tokens/s.
    assert decision == Refuse(retry_after_s=1, reason="rows_full", estimated_wait_s=2.0)
    two_rows = admission_.estimated_wait_s(RequestWork(prompt_tokens=10, new_tokens=4, rows=2))
    assert two_rows == (4.0, "rows_full")  # the second row frees after 10 steps


def test_progress_drains_the_queue_back_to_nothing() -> None:
    admission_ = controller(bound=1e9)
    admission_.try_admit("doc", long_doc(6000, new=10, rows=3))
    admission_.try_admit("hi", RequestWork(prompt_tokens=20, new_tokens=8, priority=0))
    assert admission_.figures().queued_prompt_tokens == 6020
    assert admission_.figures().queued_decode_tokens == 3 * 10 + 8
    admission_.observe_iteration(prefill_tokens=1020, decode_tokens=0, seconds=10)
    # The step's prefill comes off the earliest priority first: all of "hi", then the document.
    assert admission_.figures().queued_prompt_tokens == 5000
    admission_.first_token("doc")
    admission_.generated("doc", 4)  # NBCE-like: one stream token, every row decoded it
    assert admission_.figures().queued_prompt_tokens == 0
    assert admission_.figures().queued_decode_tokens == 3 * 6 + 8
    admission_.finish("doc")
    admission_.finish("hi")
    admission_.finish("never-admitted")
    figures = admission_.figures()
    assert (figures.queued_prompt_tokens, figures.queued_decode_tokens, figures.requests) == (0, 0, 0)
    assert figures.estimated_wait_s == 0.0


def test_it_learns_prefill_and_decode_rates_from_the_iterations() -> None:
    rates = Throughput()  # the prior
    assert rates.prefill.per_second == admission.PRIOR_PREFILL_TOKENS_PER_S
    for _ in range(1000):  # 100 s of engine time: the prior (2 s) has faded
        rates.observe_iteration(prefill_tokens=0, decode_tokens=8, seconds=0.1)  # 80 tokens/s
    assert rates.decode.per_second == pytest.approx(80, rel=0.01)
    for _ in range(40):
        # 1000 prompt tokens + 8 decode tokens (0.1 s at 80/s) in 2.1 s: 500 prompt tokens/s.
        rates.observe_iteration(prefill_tokens=1000, decode_tokens=8, seconds=2.1)
    assert rates.prefill.per_second == pytest.approx(500, rel=0.01)
    assert rates.decode.per_second == pytest.approx(80, rel=0.01)  # mixed steps do not move it


def test_the_learned_rate_changes_the_decision() -> None:
    admission_ = AdmissionController(30, throughput=Throughput(prefill_per_s=100, decode_per_s=10))
    admission_.try_admit("doc", long_doc(10_000))
    assert isinstance(admission_.decide(long_doc(10_000)), Refuse)  # 100 s at the prior's rate
    admission_.observe_iteration(prefill_tokens=2000, decode_tokens=0, seconds=1.0)
    # The engine computes 2000 prompt tokens/s: the 8,000 left take ~4-5 s.
    assert isinstance(admission_.decide(long_doc(10_000)), Admit)


def test_the_prior_fades_with_engine_time_not_with_steps() -> None:
    rate = DecayedRate(prior_per_s=100, prior_weight_s=2, half_life_s=30)
    rate.observe(tokens=1000, seconds=1)  # 1000 tokens/s for 1 s against the prior's 2 s
    assert 300 < rate.per_second < 450
    rate.observe(tokens=0, seconds=0)  # nothing measured: no change
    rate.observe(tokens=30_000, seconds=30)
    assert rate.per_second == pytest.approx(1000, rel=0.05)


def test_bound_zero_turns_it_off() -> None:
    admission_ = controller(bound=0)
    for i in range(10):
        assert isinstance(admission_.try_admit(f"r{i}", long_doc(100_000)), Admit)


def test_estimate_wait_is_plain_arithmetic() -> None:
    backlog = Backlog(prefill_ahead=3000, prefill_behind=50_000, decoding_rows=2)
    wait, reason = estimate_wait(backlog, prefill_per_s=100, decode_per_s=20, step_prefill_tokens=1000)
    # 3000 ahead + one 1000-token step of what is behind = 4000 tokens: 40 s, 4 steps x 2/20 s.
    assert (wait, reason) == (pytest.approx(40 + 4 * 0.1), "prefill_backlog")
    assert estimate_wait(Backlog(0, 0, 0), 100, 20, 1000) == (0.0, "prefill_backlog")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"prompt_tokens": -1, "new_tokens": 1},
        {"prompt_tokens": 1, "new_tokens": -1},
        {"prompt_tokens": 1, "new_tokens": 1, "rows": 0},
    ],
)
def test_work_is_counted_in_non_negative_tokens(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        RequestWork(**kwargs)


def test_after_an_engine_restart_nothing_is_queued() -> None:
    admission_ = controller(bound=1)
    admission_.try_admit("a", long_doc(50_000))
    assert isinstance(admission_.decide(long_doc(50_000)), Refuse)
    admission_.reset()
    assert admission_.decide(long_doc(50_000)) == Admit(0.0)


def test_a_refusal_is_one_of_the_counted_reasons_with_a_429_or_503() -> None:
    from server.service import refusal

    assert doctest.testmod(refusal).failed == 0
    with pytest.raises(ValueError, match="not a refusal"):
        refusal.Refusal("busy", 429, "an unknown reason is no refusal the metrics count")
    with pytest.raises(ValueError, match="not a refusal"):
        refusal.Refusal("draining", 500, "a refusal is the client's to retry: 429 or 503")
