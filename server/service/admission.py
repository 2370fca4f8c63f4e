"""Admission by queued work: the wait a new request would have before the engine starts it, and a
refusal (HTTP 429 with Retry-After) when that wait would pass a bound (`ROPESERVE_MAX_QUEUE_WAIT_S`,
default 60 s; 0 turns admission by work off).

What is counted. Every admitted request that has not finished is tracked with the prompt tokens it
still has to prefill (all its rows: NBCE's rows, the window strategies' and DCA's rows count rows x
tokens) and the new tokens each of its rows may still decode (`max_new_tokens`: an upper bound).
Prefill is what delays a new request: each vLLM step first gives every running row its decode token
and then hands the step's prefill budget out in order, so the prefill ahead of a request is served
step after step. Decoding rows make every step slower, and hold up a start only when every row slot
of the engine is taken. For a request of priority p (lower is earlier, as in vLLM):

    prefill ahead = prefill left of the requests of priority <= p
                    + at most one step (`step_prefill_tokens`) of the others': vLLM keeps giving a
                      running prefill its chunk every step, whatever the priority of what waits
    prefill wait  = prefill ahead / prefill rate + steps x decoding rows / decode rate
                    (steps = prefill ahead / step_prefill_tokens, rounded up)
    slot wait     = with `max_rows` set and fewer free than the request's rows: the decode tokens
                    left to the row that frees the last row needed, x one decode step
    wait          = max(prefill wait, slot wait)

The request's own prefill is not part of its wait. Refused when the wait passes the bound; the
Retry-After is how long the backlog takes to drain to the bound, wait - bound (at least 1 s). A
request with nothing tracked ahead of it waits 0 s and is never refused, whatever its size (what can
never fit is refused elsewhere, by capacity).

Throughput is learned from the engine's iterations (`observe_iteration`: prefill tokens, decode
tokens and seconds of one step, as vLLM's `SchedulerIterationDetails` reports them): a decode-only
step measures decode tokens/s; a step with prefill measures prefill tokens/s over its time less its
decode tokens at the decode rate. Both are weighted by engine time: every observed second halves
the weight of what came before over `HALF_LIFE_S`. Before any step is measured the rates are a
prior (`PRIOR_*`), worth `PRIOR_WEIGHT_S` seconds of engine time: 200 prompt tokens/s and 20 decode
tokens/s, about what one core of this project's CPU host does with the bundled model (a GPU
measures itself past it within its first seconds of work; until then it is conservative).
Prefill progress is not reported per request (vLLM sends nothing before the first token), so each
step's prefill tokens are taken off the tracked requests in priority order; a request's first token
clears what is left of its prefill (prefix-cache hits are counted until then: an overestimate).

    >>> admission = AdmissionController(60, throughput=Throughput(prefill_per_s=100, decode_per_s=10))
    >>> admission.try_admit("doc", RequestWork(prompt_tokens=16_000, new_tokens=16, priority=1))
    Admit(estimated_wait_s=0.0)
    >>> admission.try_admit("doc2", RequestWork(prompt_tokens=16_000, new_tokens=16, priority=1))
    Refuse(retry_after_s=100, reason='prefill_backlog', estimated_wait_s=160.0)
    >>> admission.try_admit("hi", RequestWork(prompt_tokens=20, new_tokens=8, priority=default_priority(20)))
    Admit(estimated_wait_s=20.48)
    >>> admission.observe_iteration(prefill_tokens=2048, decode_tokens=0, seconds=4.096)
    >>> admission.figures().queued_prompt_tokens, round(admission.figures().prefill_tokens_per_s)
    (13972, 377)
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections import Counter
from dataclasses import dataclass

from server.ops.metrics import AdmissionFigures
from server.settings import DEFAULT_MAX_QUEUE_WAIT_S

# A prompt under this many tokens (all rows) is short: by default it goes ahead of long documents.
SHORT_PROMPT_TOKENS = 512
# Default priorities (vLLM's: lower is scheduled earlier) for requests that do not give one.
SHORT_REQUEST_PRIORITY = 0
LONG_REQUEST_PRIORITY = 1
# vLLM's max_num_batched_tokens when the server does not set it: the prefill one step carries.
DEFAULT_STEP_PREFILL_TOKENS = 2048
PRIOR_PREFILL_TOKENS_PER_S = 200.0
PRIOR_DECODE_TOKENS_PER_S = 20.0
PRIOR_WEIGHT_S = 2.0
HALF_LIFE_S = 30.0
# In a step with prefill, at most this share of its time is put down to its decode tokens.
MAX_DECODE_SHARE = 0.9
REFUSAL_REASONS = ("prefill_backlog", "rows_full")


def is_short(prompt_tokens: int, threshold: int = SHORT_PROMPT_TOKENS) -> bool:
    """Whether a prompt (all rows' tokens) is short enough to go ahead of long documents."""
    return prompt_tokens < threshold


def default_priority(prompt_tokens: int, requested: int | None = None, threshold: int = SHORT_PROMPT_TOKENS) -> int:
    """The priority to schedule with: the client's when given, else short before long."""
    if requested is not None:
        return requested
    return SHORT_REQUEST_PRIORITY if is_short(prompt_tokens, threshold) else LONG_REQUEST_PRIORITY


@dataclass(frozen=True)
class RequestWork:
    """What one request asks of the engine: prompt tokens of all its rows, new tokens per row."""

    prompt_tokens: int
    new_tokens: int
    rows: int = 1
    priority: int = 0

    def __post_init__(self) -> None:
        if self.prompt_tokens < 0 or self.new_tokens < 0 or self.rows < 1:
            raise ValueError(f"work must be counted in tokens >= 0 and rows >= 1: {self}")


@dataclass(frozen=True)
class Admit:
    estimated_wait_s: float


@dataclass(frozen=True)
class Refuse:
    retry_after_s: int
    reason: str
    estimated_wait_s: float


Decision = Admit | Refuse


class DecayedRate:
    """Tokens per second of recent engine time: sums of tokens and seconds whose past halves with
    every `half_life_s` seconds observed; starts from `prior_per_s` worth `prior_weight_s` seconds."""

    def __init__(self, prior_per_s: float, prior_weight_s: float = PRIOR_WEIGHT_S, half_life_s: float = HALF_LIFE_S):
        if prior_per_s <= 0 or prior_weight_s <= 0 or half_life_s <= 0:
            raise ValueError("a rate's prior, its weight and the half-life must be positive")
        self._tokens = prior_per_s * prior_weight_s
        self._seconds = prior_weight_s
        self._half_life_s = half_life_s

    def observe(self, tokens: float, seconds: float) -> None:
        if seconds <= 0 or tokens < 0:
            return
        keep = 0.5 ** (seconds / self._half_life_s)
        self._tokens = self._tokens * keep + tokens
        self._seconds = self._seconds * keep + seconds

    @property
    def per_second(self) -> float:
        return self._tokens / self._seconds


class Throughput:
    """The engine's prefill and decode rates (tokens/s), learned from its iterations."""

    def __init__(
        self,
        prefill_per_s: float = PRIOR_PREFILL_TOKENS_PER_S,
        decode_per_s: float = PRIOR_DECODE_TOKENS_PER_S,
        prior_weight_s: float = PRIOR_WEIGHT_S,
        half_life_s: float = HALF_LIFE_S,
    ) -> None:
        self.prefill = DecayedRate(prefill_per_s, prior_weight_s, half_life_s)
        self.decode = DecayedRate(decode_per_s, prior_weight_s, half_life_s)

    def observe_iteration(self, prefill_tokens: int, decode_tokens: int, seconds: float) -> None:
        """One engine step: `prefill_tokens` prompt tokens computed (prefix-cache hits excluded),
        `decode_tokens` tokens decoded (one per decoding row), in `seconds`."""
        if seconds <= 0:
            return
        if prefill_tokens <= 0:
            self.decode.observe(decode_tokens, seconds)
            return
        decode_s = min(decode_tokens / self.decode.per_second, seconds * MAX_DECODE_SHARE)
        self.prefill.observe(prefill_tokens, seconds - decode_s)


@dataclass(frozen=True)
class Backlog:
    """The tracked work as a new request of some priority sees it."""

    prefill_ahead: int  # prompt tokens left of requests of the same or an earlier priority
    prefill_behind: int  # prompt tokens left of the others
    decoding_rows: int  # rows past their prefill with tokens left to decode
    slot_steps: int = 0  # decode steps until enough row slots are free (0: free now)


def estimate_wait(
    backlog: Backlog, prefill_per_s: float, decode_per_s: float, step_prefill_tokens: int
) -> tuple[float, str]:
    """(seconds before the request could start, what dominates: one of REFUSAL_REASONS)."""
    prefill = backlog.prefill_ahead + min(backlog.prefill_behind, step_prefill_tokens)
    steps = math.ceil(prefill / step_prefill_tokens)
    step_decode_s = backlog.decoding_rows / decode_per_s
    prefill_wait = prefill / prefill_per_s + steps * step_decode_s
    slot_wait = backlog.slot_steps * max(backlog.decoding_rows, 1) / decode_per_s
    if slot_wait > prefill_wait:
        return slot_wait, "rows_full"
    return prefill_wait, "prefill_backlog"


def retry_after_s(wait_s: float, bound_s: float) -> int:
    """Whole seconds until a backlog that drains at 1 s/s brings `wait_s` down to `bound_s` (>= 1)."""
    return max(1, math.ceil(wait_s - bound_s - 1e-9))


@dataclass
class _Tracked:
    work: RequestWork
    order: int
    prefill_left: int
    decode_left: int  # per row


class WorkQueue:
    """The admitted, unfinished requests and the work each has left."""

    def __init__(self) -> None:
        self._requests: dict[str, _Tracked] = {}
        self._admitted = 0

    def add(self, request_id: str, work: RequestWork) -> None:
        self._admitted += 1
        self._requests[request_id] = _Tracked(work, self._admitted, work.prompt_tokens, work.new_tokens)

    def first_token(self, request_id: str) -> None:
        if (tracked := self._requests.get(request_id)) is not None:
            tracked.prefill_left = 0

    def generated(self, request_id: str, tokens: int) -> None:
        """`tokens` new tokens of the request's stream: every row decoded that many."""
        if (tracked := self._requests.get(request_id)) is not None:
            tracked.prefill_left = 0
            tracked.decode_left = max(0, tracked.decode_left - tokens)

    def remove(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    def clear(self) -> None:
        self._requests.clear()

    def drain_prefill(self, tokens: int) -> None:
        """A step computed `tokens` prompt tokens: off the tracked prefills, earliest priority first."""
        for tracked in sorted(self._requests.values(), key=lambda t: (t.work.priority, t.order)):
            if tokens <= 0:
                return
            done = min(tokens, tracked.prefill_left)
            tracked.prefill_left -= done
            tokens -= done

    def backlog(self, priority: float, rows: int = 1, max_rows: int | None = None) -> Backlog:
        """The work ahead of a new request of `priority` needing `rows` row slots."""
        ahead = sum(t.prefill_left for t in self._requests.values() if t.work.priority <= priority)
        behind = sum(t.prefill_left for t in self._requests.values() if t.work.priority > priority)
        decoding = sum(t.work.rows for t in self._requests.values() if t.prefill_left == 0 and t.decode_left > 0)
        return Backlog(ahead, behind, decoding, self._slot_steps(rows, max_rows))

    def prefills_ahead(self, priority: float) -> int:
        """Requests of `priority` or an earlier one with prompt tokens still to prefill."""
        return sum(1 for t in self._requests.values() if t.prefill_left > 0 and t.work.priority <= priority)

    def _slot_steps(self, rows: int, max_rows: int | None) -> int:
        """Decode steps until `rows` slots are free, requests finishing in order of decode left."""
        if max_rows is None:
            return 0
        short = sum(t.work.rows for t in self._requests.values()) + rows - max_rows
        if short <= 0:
            return 0
        for tracked in sorted(self._requests.values(), key=lambda t: t.decode_left):
            short -= tracked.work.rows
            if short <= 0:
                return tracked.decode_left
        # More rows than the engine has: it waits for every row (the capacity check refuses it).
        return max((t.decode_left for t in self._requests.values()), default=0)

    @property
    def queued_prompt_tokens(self) -> int:
        return sum(t.prefill_left for t in self._requests.values())

    @property
    def queued_decode_tokens(self) -> int:
        return sum(t.decode_left * t.work.rows for t in self._requests.values())

    def __len__(self) -> int:
        return len(self._requests)


class AdmissionController:
    """Admission by queued work (see the module's doc): decide, track, learn; thread-safe."""

    def __init__(
        self,
        max_queue_wait_s: float = DEFAULT_MAX_QUEUE_WAIT_S,
        throughput: Throughput | None = None,
        step_prefill_tokens: int = DEFAULT_STEP_PREFILL_TOKENS,
        max_rows: int | None = None,
        prefill_lanes: int = 1,
    ) -> None:
        if max_queue_wait_s < 0 or step_prefill_tokens < 1 or (max_rows is not None and max_rows < 1):
            raise ValueError("max_queue_wait_s must be >= 0, step_prefill_tokens and max_rows >= 1")
        self.max_queue_wait_s = max_queue_wait_s
        self.throughput = throughput or Throughput()
        self.step_prefill_tokens = step_prefill_tokens
        self.max_rows = max_rows
        # How many prefills share a step, each capped at vLLM's long_prefill_token_threshold (the
        # step's budget over the cap): a request with fewer unfinished prefills ahead of it starts in
        # the next step beside them. 0: no cap, a started prefill holds every step until it is done.
        self.prefill_lanes = prefill_lanes
        self.queue = WorkQueue()
        self.refusals: Counter[str] = Counter({reason: 0 for reason in REFUSAL_REASONS})
        self._lock = threading.Lock()

    def estimated_wait_s(self, work: RequestWork) -> tuple[float, str]:
        """(seconds before `work` could start, the larger cause)."""
        with self._lock:
            return self._wait(work)

    def decide(self, work: RequestWork) -> Decision:
        """Admit, or Refuse with a Retry-After when the wait would pass the bound (0: never refuse)."""
        with self._lock:
            return self._decide(work)

    def try_admit(self, request_id: str, work: RequestWork) -> Decision:
        """`decide`, and on Admit track the request (until `finish`); refusals are counted by reason."""
        with self._lock:  # one decision at a time: two requests cannot both take the last place
            decision = self._decide(work)
            if isinstance(decision, Admit):
                self.queue.add(request_id, work)
            else:
                self.refusals[decision.reason] += 1
        return decision

    def _wait(self, work: RequestWork) -> tuple[float, str]:
        backlog = self.queue.backlog(work.priority, work.rows, self.max_rows)
        if not self.prefill_lanes:
            backlog = dataclasses.replace(
                backlog, prefill_ahead=backlog.prefill_ahead + backlog.prefill_behind, prefill_behind=0
            )
        elif self.queue.prefills_ahead(work.priority) < self.prefill_lanes:
            backlog = dataclasses.replace(
                backlog, prefill_ahead=0, prefill_behind=backlog.prefill_ahead + backlog.prefill_behind
            )
        rates = self.throughput.prefill.per_second, self.throughput.decode.per_second
        wait, reason = estimate_wait(backlog, *rates, self.step_prefill_tokens)
        return round(wait, 3), reason

    def _decide(self, work: RequestWork) -> Decision:
        wait, reason = self._wait(work)
        if self.max_queue_wait_s == 0 or wait <= self.max_queue_wait_s:
            return Admit(wait)
        return Refuse(retry_after_s(wait, self.max_queue_wait_s), reason, wait)

    def admit(self, request_id: str, work: RequestWork) -> None:
        """Track a request without deciding (one admitted by other means)."""
        with self._lock:
            self.queue.add(request_id, work)

    def first_token(self, request_id: str) -> None:
        with self._lock:
            self.queue.first_token(request_id)

    def generated(self, request_id: str, tokens: int) -> None:
        with self._lock:
            self.queue.generated(request_id, tokens)

    def finish(self, request_id: str) -> None:
        """The request ended (done, failed, cancelled); unknown ids are ignored."""
        with self._lock:
            self.queue.remove(request_id)

    def reset(self) -> None:
        """The engine was replaced: nothing it held is queued any more."""
        with self._lock:
            self.queue.clear()

    def observe_iteration(self, prefill_tokens: int, decode_tokens: int, seconds: float) -> None:
        """One engine step (see `Throughput.observe_iteration`): learn the rates, drain prefill."""
        with self._lock:
            self.throughput.observe_iteration(prefill_tokens, decode_tokens, seconds)
            self.queue.drain_prefill(prefill_tokens)

    def figures(self) -> AdmissionFigures:
        behind_everything = RequestWork(prompt_tokens=0, new_tokens=0, priority=2**62)
        with self._lock:
            wait, _ = self._wait(behind_everything)
            return AdmissionFigures(
                queued_prompt_tokens=self.queue.queued_prompt_tokens,
                queued_decode_tokens=self.queue.queued_decode_tokens,
                requests=len(self.queue),
                estimated_wait_s=wait,
                prefill_tokens_per_s=self.throughput.prefill.per_second,
                decode_tokens_per_s=self.throughput.decode.per_second,
                refusals=dict(self.refusals),
            )
