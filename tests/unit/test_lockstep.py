"""The lockstep runner's control flow (server/service/lockstep.py), with NBCE's combiner, on a
scripted engine: tokens are confirmed only where every row agrees, rows out of step are
resubmitted with the confirmed tokens appended, stop strings, EOS and max_new_tokens end the
request, a failed row fails it, and closing the stream aborts the rows.

The combination itself runs inside the real engine (tests/e2e/test_nbce_engine.py); here the rows'
outputs are scripted, which is how the rare desync paths get exercised at all."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest

from server.engines.base import (
    EngineDown,
    EngineStep,
    ExecutionPlan,
    RowRequest,
    SamplingOptions,
    StepStream,
    TokenEvent,
)
from server.plan import ModelFacts, RopeConfig
from server.service.lockstep import MAX_RESUBMITS, LockstepError, run_lockstep
from strategies.nbce.protocol import Combination, NbceCombiner, RowTag

SPECIAL, EOS = 0, 1


class LetterTokenizer:
    """Token t > 1 is the letter chr(ord("a") + t - 2); 0 is a special token, 1 is EOS."""

    eos_token_id = EOS
    all_special_ids = [SPECIAL, EOS]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(ord("a") + t - 2) for t in ids if t > 1)


def letters(text: str) -> list[int]:
    return [ord(c) - ord("a") + 2 for c in text]


# Per attempt, per row: the chunks of tokens the row's stream yields (a row ends after its last
# chunk), or an exception the stream raises.
Script = list[list[list[list[int]] | BaseException]]


@dataclass
class ScriptedEngine:
    script: Script
    model: ModelFacts = ModelFacts("m", 64, {}, 8, 32, eos_token_ids=(EOS,))
    tokenizer: LetterTokenizer = field(default_factory=LetterTokenizer)
    prefilled: list[RowRequest] = field(default_factory=list)
    groups: list[list[RowRequest]] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    closed: list[str] = field(default_factory=list)

    async def generate(self, row: RowRequest) -> StepStream:
        self.prefilled.append(row)
        yield EngineStep([TokenEvent(SPECIAL, "", None, True)], finished=True)

    async def generate_group(self, rows: list[RowRequest]) -> list[StepStream]:
        attempt = len(self.groups)
        self.groups.append(rows)
        return [self._row(row, self.script[attempt][k]) for k, row in enumerate(rows)]

    async def _row(self, row: RowRequest, chunks: list[list[int]] | BaseException) -> StepStream:
        try:
            if isinstance(chunks, BaseException):
                raise chunks
            for i, chunk in enumerate(chunks):
                await asyncio.sleep(0)
                tokens = [TokenEvent(t, "", None, False) for t in chunk]
                yield EngineStep(tokens, finished=i == len(chunks) - 1)
            await asyncio.sleep(3600)  # a row that has nothing more to say stays open
        finally:
            self.closed.append(row.request_id)

    async def abort(self, request_ids: list[str]) -> None:
        self.aborted.extend(request_ids)


@dataclass
class Job:
    request_id: str
    plan: ExecutionPlan
    sampling: SamplingOptions
    stats: dict[str, Any] = field(default_factory=dict)
    priority: int = 0


ROWS = [[5, 6], [7, 8, 9], [10]]


def job(max_new_tokens: int = 8, **sampling: Any) -> Job:
    plan = ExecutionPlan(RopeConfig.native(), [list(r) for r in ROWS], 64, {})
    return Job("req", plan, SamplingOptions(max_new_tokens=max_new_tokens, **sampling))


async def run(engine: ScriptedEngine, request: Job) -> list[EngineStep]:
    return [step async for step in run_lockstep(engine, request, NbceCombiner(Combination()))]  # type: ignore[arg-type]


def same(*chunks: list[int]) -> list[list[int]]:
    return [list(c) for c in chunks]


async def test_agreed_tokens_stream_until_max_new_tokens() -> None:
    engine = ScriptedEngine([[same(letters("ab"), letters("cd"))] * 3])
    steps = await run(engine, request := job(max_new_tokens=3))
    assert [s.tokens[0].id for s in steps] == letters("abc") and "".join(s.text for s in steps) == "abc"
    assert [s.finish_reason for s in steps] == [None, None, "length"] and steps[-1].finished
    assert request.stats == {"kv_tokens": 6 + 3 * 3, "nbce_rows": 3, "nbce_resubmits": 0}
    assert [r.request_id for r in engine.prefilled] == ["req:prefill:0", "req:prefill:1", "req:prefill:2"]
    assert [r.request_id for r in engine.groups[0]] == ["req:0:0", "req:0:1", "req:0:2"]
    tag = RowTag.from_extra_args(engine.groups[0][1].sampling.extra_args)
    assert tag is not None and (tag.group, tag.row, tag.rows, tag.base) == ("req:0", 1, 3, 0)
    assert sorted(engine.closed) == ["req:0:0", "req:0:1", "req:0:2"]
    assert set(engine.aborted) >= {"req:0:0", "req:0:1", "req:0:2"}


async def test_rows_out_of_step_are_resubmitted_with_the_confirmed_tokens() -> None:
    first = [same(letters("ab"), letters("c")), same(letters("ab"), letters("x")), same(letters("abc"))]
    second = [same(letters("cd"))] * 3
    engine = ScriptedEngine([first, second])
    steps = await run(engine, request := job(max_new_tokens=4))
    assert "".join(s.text for s in steps) == "abcd" and steps[-1].finish_reason == "length"
    assert request.stats["nbce_resubmits"] == 1
    resubmitted = engine.groups[1]
    assert [r.prompt_token_ids for r in resubmitted] == [r + letters("ab") for r in ROWS]
    assert all(r.sampling.max_new_tokens == 2 for r in resubmitted)
    tag = RowTag.from_extra_args(resubmitted[0].sampling.extra_args)
    assert tag is not None and (tag.group, tag.base) == ("req:1", 2)


async def test_rows_that_all_end_without_finishing_are_resubmitted() -> None:
    first = [same(letters("ab")), same(letters("abc")), same(letters("ab"))]
    engine = ScriptedEngine([first, [same(letters("cd"))] * 3])
    steps = await run(engine, request := job(max_new_tokens=4))
    assert "".join(s.text for s in steps) == "abcd" and request.stats["nbce_resubmits"] == 1


async def test_eos_ends_the_request_unless_ignored() -> None:
    rows = [same([*letters("a"), EOS, *letters("b")])] * 3
    steps = await run(ScriptedEngine([rows]), job())
    assert [s.tokens[0].id for s in steps] == [*letters("a"), EOS] and steps[-1].finish_reason == "eos_token"
    assert steps[-1].tokens[0].special and steps[-1].text == ""
    steps = await run(ScriptedEngine([rows]), job(max_new_tokens=3, ignore_eos=True))
    assert [s.tokens[0].id for s in steps] == [*letters("a"), EOS, *letters("b")]


async def test_a_stop_string_ends_the_request_and_is_cut_from_the_text() -> None:
    steps = await run(ScriptedEngine([[same(letters("abcdef"))] * 3]), job(stop=("cd",)))
    assert "".join(s.text for s in steps) == "ab" and steps[-1].finish_reason == "stop_sequence"
    assert len(steps) == 4


async def test_text_that_may_begin_a_stop_string_is_held_back_until_it_cannot() -> None:
    steps = await run(ScriptedEngine([[same(letters("abcdef"))] * 3]), job(max_new_tokens=6, stop=("cx",)))
    assert [s.text for s in steps] == ["", "a", "b", "c", "d", "ef"] and steps[-1].finish_reason == "length"


async def test_a_failed_row_fails_the_request() -> None:
    rows: list[list[list[int]] | BaseException] = [same(letters("ab")), RuntimeError("row died"), same(letters("ab"))]
    engine = ScriptedEngine([rows])
    with pytest.raises(LockstepError, match="row died"):
        await run(engine, job())
    assert set(engine.aborted) >= {"req:0:0", "req:0:1", "req:0:2"}


async def test_an_engine_death_fails_the_request_as_the_engines_death() -> None:
    """Not wrapped in LockstepError: the HTTP layer answers EngineDown with 503 whatever the strategy."""
    died = EngineDown("the engine died while serving this request")
    engine = ScriptedEngine([[same(letters("ab")), died, same(letters("ab"))]])
    with pytest.raises(EngineDown, match="engine died"):
        await run(engine, job())
    assert set(engine.aborted) >= {"req:0:0", "req:0:1", "req:0:2"}


async def test_every_row_runs_at_the_requests_priority() -> None:
    engine = ScriptedEngine([[same(letters("ab"))] * 3])
    request = job(max_new_tokens=2)
    request.priority = 7
    await run(engine, request)
    rows = engine.prefilled + [row for group in engine.groups for row in group]
    assert len(rows) == 6 and {row.priority for row in rows} == {7}


async def test_rows_that_never_agree_are_given_up() -> None:
    never = [same(letters("a")), same(letters("b")), same(letters("a"))]
    engine = ScriptedEngine([never] * (MAX_RESUBMITS + 2))
    with pytest.raises(LockstepError, match="out of step"):
        await run(engine, job())
    assert len(engine.groups) == MAX_RESUBMITS + 1


async def test_closing_the_stream_aborts_the_rows() -> None:
    engine = ScriptedEngine([[same(letters("abcdef"))] * 3])
    stream = run_lockstep(engine, job(), NbceCombiner(Combination()))  # type: ignore[arg-type]
    first = await anext(stream)
    assert first.text == "a"
    await stream.aclose()
    assert set(engine.aborted) >= {"req:0:0", "req:0:1", "req:0:2"}
    assert sorted(engine.closed) == ["req:0:0", "req:0:1", "req:0:2"]
    # Nothing of the request is left running once the stream is closed.
    assert [t for t in asyncio.all_tasks() if t.get_coro().__name__ == "_pump" and not t.done()] == []
