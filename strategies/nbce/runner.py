"""Runs NBCE plans: all rows of a request decode in lockstep inside the shared vLLM engine.

`NbceCombiner` is the `RowCombiner` (server/engines/base.py) an NBCE plan carries; the service
runs it in place of a single-row generation.

Design
------
* **Exact, in the engine.** The combination happens in a batch-level vLLM logits processor
  (processor.py, arithmetic in combine.py) on the full-vocabulary float32 logits of the rows: at a
  step where every row of the request is scheduled at its decode point and at the same output
  length, it computes the NBCE token (pooling, beta, eta, optional per-row top_p, then greedy or
  seeded sampling) and forces it in every row. Nothing is approximated: the tokens are those of
  a straightforward NBCE over the same rows and the engine's logits. (A step-by-step design that
  combined top-20 logprobs in the server was tried first and was not exact.)
* **Batched, not serialized.** The rows are ordinary vLLM requests: they share the continuous
  batch with every other request, and an NBCE request blocks nobody.
* **Lockstep and resubmission.** Rows must enter the batch together. The runner first prefills
  every row, one after the other, as a one-token request (chunked prefill, interleaved with other
  traffic, filling the prefix cache), then admits the rows as one group (`VllmEngine.generate_group`: the scheduler
  is held for the few milliseconds of the admission), so they start from cache hits in one step.
  Should they still fall out of step (a peer prefilled in a later step under a full token budget,
  preemption under KV pressure), the processor forces per-row marker tokens, the rows' outputs
  disagree at that position, and the runner aborts the rows and submits them again with the
  confirmed tokens appended to their prompts — cheap, since prefix caching keeps their KV. A token
  is confirmed only when every row emitted it at the same position, so a desync never leaks out.
  `job.stats["nbce_resubmits"]` counts these; they are rare (0 in the common case).
* **dtype.** vLLM runs the bundled model in bfloat16 on CPU by default. The processor combines
  whatever logits the engine computes, so NBCE is exact with respect to the engine in any dtype;
  but a bf16 engine and a transformers reference never agree bit for bit (different kernels,
  logits rounded to 8 mantissa bits: ties between top tokens are common). The exactness tests
  therefore run the engine in float32 (`ROPESERVE_DTYPE=float32`, what the test server uses) and
  compare with the float32 reference (tests/support/nbce_reference.py); near-ties (top-2 gap < 1e-4)
  may break either way. Production serving may keep bf16.
* **Streaming, cancellation.** Each confirmed token is yielded as an EngineStep at once; if the
  consumer goes away, every row of the request is aborted (their KV blocks freed).
* **Accounting.** `job.stats["kv_tokens"]` is what the rows held together (all rows' prompts plus
  every row's generated tokens).

Repetition/frequency/presence penalties are not applied to NBCE (the rows are forced); stop
strings, EOS, ignore_eos, max_new_tokens and do_sample/temperature/top_k/top_p/seed are.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from server.engines.base import (
    Engine,
    EngineStep,
    FinishReason,
    RowJob,
    RowRequest,
    SamplingOptions,
    StepStream,
    TokenEvent,
    Tokenizer,
)
from strategies.nbce.protocol import Combination, Draw, RowTag

log = logging.getLogger(__name__)

MAX_RESUBMITS = 64


class NbceError(RuntimeError):
    pass


class _Detokenizer:
    """Incremental text of the confirmed tokens (holds back incomplete UTF-8)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        # Decoding the whole sequence again keeps spacing exact; the earlier text never changes
        # except for a held-back partial character.
        common = 0
        for a, b in zip(self.emitted, text, strict=False):
            if a != b:
                break
            common += 1
        delta = text[common:]
        self.emitted = text
        return delta


async def _drain(stream: StepStream) -> None:
    async for _ in stream:
        pass


@dataclass(frozen=True)
class NbceCombiner:
    """The `RowCombiner` of an NBCE plan: its rows are [question alone, document rows...]."""

    combination: Combination
    name: str = "nbce"

    def run(self, engine: Engine, job: RowJob) -> StepStream:
        return run_nbce(engine, job, self.combination)


async def _prefill(engine: Engine, job: RowJob) -> None:
    """Every row as a one-token request: fills the prefix cache, batched with other traffic.

    One row after the other: a row in chunked prefill is a *running* request and takes the whole
    token budget of a step, so all rows at once would keep newly arriving requests waiting until
    the whole document is read (measured: 2 ordinary requests served in 560 s of a 30k-token
    NBCE prefill). Row by row, requests that arrive meanwhile are admitted between rows.
    """
    for k, row in enumerate(job.plan.rows):
        request = RowRequest(f"{job.request_id}:prefill:{k}", row, SamplingOptions(max_new_tokens=1), job.plan.rope)
        stream = engine.generate(request)
        try:
            await _drain(stream)
        finally:
            await stream.aclose()


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


async def run_nbce(engine: Engine, job: RowJob, combination: Combination) -> StepStream:
    plan, sampling = job.plan, job.sampling
    rows: list[list[int]] = plan.rows
    n = len(rows)
    tokenizer = engine.tokenizer
    special = frozenset(tokenizer.all_special_ids or ())
    eos = set(engine.model.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    max_new = sampling.max_new_tokens
    stops = tuple(s for s in sampling.stop if s)
    draw = Draw.from_sampling(sampling)
    prompt_total = sum(len(r) for r in rows)
    confirmed: list[int] = []
    detok = _Detokenizer(tokenizer)
    job.stats.update(kv_tokens=prompt_total, nbce_rows=n, nbce_resubmits=0)
    current_ids: list[str] = []

    async def abort_current() -> None:
        if current_ids:
            ids = list(current_ids)
            current_ids.clear()
            try:
                await asyncio.shield(engine.abort(ids))
            except Exception:
                log.debug("abort of nbce rows failed", exc_info=True)

    try:
        await _prefill(engine, job)
        attempt = 0
        finish: FinishReason | None = None
        while finish is None:
            remaining = max_new - len(confirmed)
            group = f"{job.request_id}:{attempt}"
            row_requests = [
                RowRequest(
                    f"{group}:{k}",
                    rows[k] + confirmed,
                    SamplingOptions(
                        max_new_tokens=remaining,
                        greedy=True,
                        ignore_eos=sampling.ignore_eos,
                        extra_args=RowTag(
                            job=job.request_id,
                            group=group,
                            row=k,
                            rows=n,
                            base=len(confirmed),
                            combination=combination,
                            draw=draw,
                        ).to_extra_args(),
                    ),
                    plan.rope,
                )
                for k in range(n)
            ]
            current_ids[:] = [r.request_id for r in row_requests]
            streams = await engine.generate_group(row_requests)
            queue: asyncio.Queue[Pumped] = asyncio.Queue()
            tasks = [asyncio.create_task(_pump(k, s, queue)) for k, s in enumerate(streams)]
            outs: list[list[int]] = [[] for _ in range(n)]
            ended = [False] * n
            pos = 0
            desynced = False
            try:
                while finish is None and not desynced:
                    k, step = await queue.get()
                    if isinstance(step, BaseException):
                        raise NbceError(f"an nbce row failed: {step}") from step
                    if step is None:
                        ended[k] = True
                    else:
                        outs[k].extend(t.id for t in step.tokens)
                        if step.finished:
                            ended[k] = True
                    while finish is None and all(len(o) > pos for o in outs):
                        token = outs[0][pos]
                        if any(o[pos] != token for o in outs):
                            desynced = True
                            break
                        pos += 1
                        confirmed.append(token)
                        is_eos = token in eos and not sampling.ignore_eos
                        delta = "" if token in special else detok.add(token)
                        event = TokenEvent(
                            id=token, text=tokenizer.decode([token]), logprob=None, special=token in special
                        )
                        if stops:
                            hit = _find_stop(detok.emitted, stops, len(detok.emitted) - len(delta))
                            if hit is not None:
                                cut = len(detok.emitted) - hit  # characters past the stop's start
                                delta = delta[: max(0, len(delta) - cut)]
                                finish = "stop_sequence"
                        if finish is None and is_eos:
                            finish = "eos_token"
                        if finish is None and len(confirmed) >= max_new:
                            finish = "length"
                        job.stats["kv_tokens"] = prompt_total + n * len(confirmed)
                        yield EngineStep(
                            tokens=[event],
                            text=delta,
                            finished=finish is not None,
                            finish_reason=finish,
                            prompt_tokens=prompt_total,
                        )
                    if finish is None and not desynced and all(ended):
                        # Every row stopped without the group finishing: they disagreed on length.
                        desynced = True
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                await abort_current()
            if desynced:
                attempt += 1
                job.stats["nbce_resubmits"] = attempt
                log.info(
                    "nbce %s: rows out of step at token %d; resubmitting (attempt %d)",
                    job.request_id,
                    len(confirmed),
                    attempt,
                )
                if attempt > MAX_RESUBMITS:
                    raise NbceError(f"nbce rows fell out of step {attempt} times; giving up")
    finally:
        await abort_current()


def _find_stop(text: str, stops: tuple[str, ...], new_from: int) -> int | None:
    """Start of the first stop string that ends in the new part of `text`, else None."""
    start = max(0, new_from - max(len(s) for s in stops))
    best = None
    for s in stops:
        i = text.find(s, start)
        if i != -1 and (best is None or i < best):
            best = i
    return best
