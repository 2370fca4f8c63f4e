"""Every output constraint compiled once, off the event loop and within a time bound, before its
request is planned to run: a constraint that does not compile is a 422 naming its field, never an
engine failure.

The compile runs in the engine's grammar checker (server/engines/grammar_check.py: a child process
killed past `COMPILE_TIMEOUT_S`), called from a worker thread, so `/health` and every other request
keep being served meanwhile. Verdicts are cached per constraint (kind and text), the refusals too:
a schema asked again costs a dictionary lookup, and the same schema asked by many requests at once
is compiled once.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Protocol

from server.engines.grammar_check import CompileVerdict
from server.plan import OutputConstraint, StrategyError

log = logging.getLogger(__name__)

# Verdicts kept (least recently used dropped first); a constraint is at most MAX_CONSTRAINT_CHARS.
CACHED_VERDICTS = 512


class ConstraintCompiler(Protocol):
    """What compiles a constraint as the engine will (blocking): server/engines/grammar_check.py."""

    def start(self) -> None: ...

    def compile(self, constraint: OutputConstraint) -> CompileVerdict: ...

    def close(self) -> None: ...


class ConstraintCheck:
    def __init__(self, compiler: ConstraintCompiler, cached: int = CACHED_VERDICTS) -> None:
        self.compiler = compiler
        self.cached = cached
        self._verdicts: OrderedDict[tuple[str, str], str | None] = OrderedDict()
        self._pending: dict[tuple[str, str], asyncio.Task[str | None]] = {}
        # One compile at a time: the checker is one process.
        self._lock = asyncio.Lock()
        self.compiles = 0
        self._starting: asyncio.Task[None] | None = None

    def start_soon(self) -> None:
        """Start the compiler in the background, ahead of the first constraint (it takes seconds)."""
        self._starting = asyncio.create_task(asyncio.to_thread(self.compiler.start))
        self._starting.add_done_callback(_log_failure)

    async def check(self, constraint: OutputConstraint) -> None:
        """Raises StrategyError (422) naming the constraint's field when it does not compile."""
        error = await self.verdict(constraint)
        if error is not None:
            field = constraint.source or "constraint"
            raise StrategyError(f"{field}: does not compile: {error}", field=field)

    async def verdict(self, constraint: OutputConstraint) -> str | None:
        """Why `constraint` does not compile (None: it does), compiled at most once; a request that
        goes away meanwhile leaves the compile running for the others."""
        key = constraint.key()
        if key in self._verdicts:
            self._verdicts.move_to_end(key)
            return self._verdicts[key]
        task = self._pending.get(key)
        if task is None:
            task = self._pending[key] = asyncio.create_task(self._compile(constraint))
            task.add_done_callback(lambda done: self._compiled(key, done))
        return await asyncio.shield(task)

    async def _compile(self, constraint: OutputConstraint) -> str | None:
        async with self._lock:
            verdict = await asyncio.to_thread(self.compiler.compile, constraint)
        self.compiles += 1
        self._remember(constraint.key(), verdict.error)
        return verdict.error

    def _compiled(self, key: tuple[str, str], task: asyncio.Task[str | None]) -> None:
        self._pending.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved here: a caller that went away need not

    def _remember(self, key: tuple[str, str], error: str | None) -> None:
        self._verdicts[key] = error
        while len(self._verdicts) > self.cached:
            self._verdicts.popitem(last=False)

    def close(self) -> None:
        self.compiler.close()


class _Unchecked:
    """A server without a constraint check serves no constraint."""

    async def check(self, constraint: OutputConstraint) -> None:
        field = constraint.source or "constraint"
        raise StrategyError(f"{field}: structured output is not available on this server", field=field)


refuse_unchecked = _Unchecked()


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        # The first constraint starts it again (and fails with the reason, a 424, if it still cannot).
        log.warning("the grammar checker did not start: %s", exc)
