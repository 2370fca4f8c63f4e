"""Runs a plan's rows in lockstep: all rows of a request decode together inside the shared engine,
one token forced into every row at each step by a logits processor in the engine.

A plan whose combiner is a `LockstepCombiner` (server/plan.py; NBCE's: strategies/nbce/protocol.py)
is run here in place of a single-row generation; the combiner only says what each row carries to
its processor (NBCE: strategies/nbce/processor.py, arithmetic in combine.py).

Design
------
* **Exact, in the engine.** The combination happens in a batch-level vLLM logits processor on the
  full-vocabulary float32 logits of the rows: at a step where every row of the request is
  scheduled at its decode point and at the same output length, it computes the combined token
  and forces it in every row. Nothing is approximated: the tokens are those of a straightforward
  combination over the same rows and the engine's logits.
* **Batched, not serialized.** The rows are ordinary engine requests: they share the continuous
  batch with every other request, and a multi-row request blocks nobody.
* **Lockstep and resubmission.** Rows must enter the batch together. The runner first prefills
  every row, one after the other, as a one-token request (chunked prefill, interleaved with other
  traffic, filling the prefix cache), then admits the rows as one group (`Engine.generate_group`:
  the scheduler is held for the few milliseconds of the admission), so they start from cache hits
  in one step. Should they still fall out of step (a peer prefilled in a later step under a full
  token budget, preemption under KV pressure), the processor forces per-row marker tokens, the
  rows' outputs disagree at that position, and the runner aborts the rows and submits them again
  with the confirmed tokens appended to their prompts — cheap, since prefix caching keeps their KV.
  A token is confirmed only when every row emitted it at the same position, so a desync never
  leaks out. `job.stats["<name>_resubmits"]` counts these; they are rare (0 in the common case).
* **dtype.** vLLM runs the bundled model in bfloat16 on CPU by default. The processor combines
  whatever logits the engine computes, so the combination is exact with respect to the engine in
  any dtype; but a bf16 engine and a transformers reference never agree bit for bit (different
  kernels, logits rounded to 8 mantissa bits: ties between top tokens are common). NBCE's
  exactness tests therefore run the engine in float32 (`ROPESERVE_DTYPE=float32`, what the test
  server uses) and compare with the float32 reference (tests/support/nbce_reference.py);
  near-ties (top-2 gap < 1e-4) may break either way. Production serving may keep bf16.
* **Streaming, cancellation.** Each confirmed token is yielded as an EngineStep at once (its text
  held back while it may be the start of a stop string, as vLLM does for ordinary rows); if the
  consumer goes away, every row of the request is aborted (their KV blocks freed).
* **Accounting.** `job.stats["kv_tokens"]` is what the rows held together (all rows' prompts plus
  every row's generated tokens).

Repetition/frequency/presence penalties are not applied to lockstep rows (the rows are forced);
stop strings, EOS, ignore_eos, max_new_tokens and do_sample/temperature/top_k/top_p/seed are (the
last five by the combiner's processor), and an output constraint (structured output: NBCE keeps one
grammar state per group, masking every row before the combination; strategies/nbce/grammar.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

from server.engines.base import (
    Engine,
    EngineDown,
    EngineStep,
    LockstepCombiner,
    LockstepRow,
    RowJob,
    RowRequest,
    SamplingOptions,
    StepStream,
)
from server.service.text_output import OutputText

log = logging.getLogger(__name__)

MAX_RESUBMITS = 64


class LockstepError(RuntimeError):
    pass


def run_lockstep(engine: Engine, job: RowJob, combiner: LockstepCombiner) -> StepStream:
    """The combined token stream of the job's rows (`job.plan.rows`), decoded in lockstep."""
    return _LockstepRequest(engine, job, combiner).stream()


class _LockstepRequest:
    """One request: its rows prefilled, submitted as a group, resubmitted whenever they fall out of
    step, and the tokens they agree on yielded as the request's steps."""

    def __init__(self, engine: Engine, job: RowJob, combiner: LockstepCombiner) -> None:
        self.engine = engine
        self.job = job
        self.combiner = combiner
        self.rows = job.plan.rows
        # The confirmed tokens as the request's steps (their text, stop strings, EOS, length).
        self.tokens = OutputText(
            engine.tokenizer, engine.model.eos_token_ids, job.sampling, prompt_tokens=job.plan.prompt_tokens
        )
        self._submitted: list[str] = []  # engine request ids of the rows running now
        job.stats.update(
            {"kv_tokens": job.plan.prompt_tokens, f"{combiner.name}_rows": len(self.rows), self._resubmits: 0}
        )

    @property
    def _resubmits(self) -> str:
        return f"{self.combiner.name}_resubmits"

    async def stream(self) -> StepStream:
        try:
            await _prefill(self.engine, self.job, self.combiner)
            attempt = 0
            while True:
                # aclosing: when the consumer goes away, the submission's rows are stopped here and now.
                async with contextlib.aclosing(self._submission(attempt)) as steps:
                    async for step in steps:
                        yield step
                if self.tokens.finish is not None:
                    return
                attempt += 1
                self._count_resubmit(attempt)
        finally:
            await self._abort_submitted()

    async def _submission(self, attempt: int) -> StepStream:
        """Run the rows as one group until the request finishes or the rows fall out of step."""
        rows = self._row_requests(f"{self.job.request_id}:{attempt}")
        self._submitted = [r.request_id for r in rows]
        streams = await self.engine.generate_group(rows)
        queue: asyncio.Queue[Pumped] = asyncio.Queue()
        tasks = [asyncio.create_task(_pump(k, s, queue)) for k, s in enumerate(streams)]
        lockstep = _Lockstep(len(rows), self.combiner.name)
        try:
            while not lockstep.stuck:
                lockstep.receive(*await queue.get())
                for token in lockstep.agreed_tokens():
                    yield self._confirm(token)
                    if self.tokens.finish is not None:
                        return
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._abort_submitted()

    def _row_requests(self, group: str) -> list[RowRequest]:
        """The rows with the confirmed tokens appended, each tagged by the combiner for its processor."""
        confirmed, sampling = self.tokens.ids, self.job.sampling
        stop_token_ids = tuple(sorted(self.tokens.eos))
        return [
            RowRequest(
                f"{group}:{k}",
                row + confirmed,
                SamplingOptions(
                    max_new_tokens=sampling.max_new_tokens - len(confirmed),
                    greedy=True,
                    ignore_eos=sampling.ignore_eos,
                    extra_args=self.combiner.row_args(
                        LockstepRow(self.job.request_id, group, k, len(self.rows), len(confirmed), stop_token_ids),
                        sampling,
                    ),
                ),
                self.job.plan.rope,
                self.job.priority,
            )
            for k, row in enumerate(self.rows)
        ]

    def _confirm(self, token: int) -> EngineStep:
        step = self.tokens.add(token)
        self.job.stats["kv_tokens"] = self.job.plan.prompt_tokens + len(self.rows) * len(self.tokens.ids)
        return step

    def _count_resubmit(self, attempt: int) -> None:
        self.job.stats[self._resubmits] = attempt
        log.info(
            "%s %s: rows out of step at token %d; resubmitting (attempt %d)",
            self.combiner.name,
            self.job.request_id,
            len(self.tokens.ids),
            attempt,
        )
        if attempt > MAX_RESUBMITS:
            raise LockstepError(f"{self.combiner.name} rows fell out of step {attempt} times; giving up")

    async def _abort_submitted(self) -> None:
        if not self._submitted:
            return
        ids, self._submitted = self._submitted, []
        try:
            await asyncio.shield(self.engine.abort(ids))
        except Exception:
            log.debug("abort of %s rows failed", self.combiner.name, exc_info=True)


async def _prefill(engine: Engine, job: RowJob, combiner: LockstepCombiner) -> None:
    """Every row as a one-token request: fills the prefix cache, batched with other traffic.

    One row after the other: a row in chunked prefill is a *running* request and takes the whole
    token budget of a step, so all rows at once would keep newly arriving requests waiting until
    the whole document is read (measured: 2 ordinary requests served in 560 s of a 30k-token
    NBCE prefill). Row by row, requests that arrive meanwhile are admitted between rows.
    """
    for k, row in enumerate(job.plan.rows):
        one_token = SamplingOptions(max_new_tokens=1, extra_args=combiner.prefill_args(job.sampling))
        request = RowRequest(f"{job.request_id}:prefill:{k}", row, one_token, job.plan.rope, job.priority)
        stream = engine.generate(request)
        try:
            async for _ in stream:
                pass
        finally:
            await stream.aclose()


# A row's next step, tagged with the row's index: None when its stream ended, an exception when it failed.
Pumped = tuple[int, EngineStep | BaseException | None]


async def _pump(k: int, stream: StepStream, queue: asyncio.Queue[Pumped]) -> None:
    try:
        async for step in stream:
            await queue.put((k, step))
        await queue.put((k, None))
    except asyncio.CancelledError:
        raise
    except BaseException as exc:  # noqa: BLE001 - handed to the runner
        await queue.put((k, exc))
    finally:
        with contextlib.suppress(BaseException):  # the row is gone either way; a failure was reported
            await stream.aclose()


class _Lockstep:
    """The outputs of one submission's rows, and how far they agree: a token is confirmed only when
    every row emitted it at the same position, so a desync never leaks out."""

    def __init__(self, rows: int, name: str) -> None:
        self.name = name
        self.outputs: list[list[int]] = [[] for _ in range(rows)]
        self.ended = [False] * rows
        self.agreed = 0
        self.desynced = False

    def receive(self, k: int, step: EngineStep | BaseException | None) -> None:
        if isinstance(step, EngineDown):  # the engine died: the request's 503, as for any strategy
            raise step
        if isinstance(step, BaseException):
            raise LockstepError(f"an {self.name} row failed: {step}") from step
        if step is None:
            self.ended[k] = True
            return
        self.outputs[k].extend(t.id for t in step.tokens)
        if step.finished:
            self.ended[k] = True

    def agreed_tokens(self) -> Iterator[int]:
        """The tokens every row has emitted at the next positions, in order, up to the first
        position where the rows disagree (then `desynced`)."""
        while all(len(out) > self.agreed for out in self.outputs):
            token = self.outputs[0][self.agreed]
            if any(out[self.agreed] != token for out in self.outputs):
                self.desynced = True
                return
            self.agreed += 1
            yield token

    @property
    def stuck(self) -> bool:
        """No more tokens can be confirmed: the rows disagreed, or every row stopped (they
        disagreed on the length)."""
        return self.desynced or all(self.ended)
