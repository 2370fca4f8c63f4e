"""vLLM's V1 `AsyncLLM` (vllm/v1/engine/async_llm.py) and what server/engines/vllm_engine.py (with
the vllm_*.py modules beside it) uses of it beyond `generate`: the engine-core client's scheduler
pause, the queue `add_request` returns, the error of a dead engine, and stat-logger classes.

They import this module where they start using vLLM (not at their own import), so the API process
loads vLLM only once an engine starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any

from vllm.outputs import STREAM_FINISHED
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError
from vllm.v1.metrics.loggers import PrometheusStatLogger, StatLoggerBase

__all__ = [
    "AsyncLLM",
    "memoize_logprob_token_texts",
    "EngineDeadError",
    "RequestQueue",
    "add_request",
    "engine_core_processes",
    "recording_stat_logger",
    "scheduler_paused",
    "silent_prometheus_logger",
]

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def scheduler_paused(llm: Any) -> AsyncIterator[None]:
    """vLLM's scheduler paused while the body runs ("keep": running requests stay, nothing is
    stepped), then resumed; where the engine cannot pause, the body runs all the same.

    `AsyncLLM.pause_generation` would do the same and then sleep 20 ms; the engine-core client's
    own calls (`llm.engine_core`) pause and resume without waiting.
    """
    core = llm.engine_core
    paused = False
    try:
        await core.pause_scheduler_async(mode="keep", clear_cache=False)
        paused = True
    except Exception:  # an engine without pause: the body still runs, its requests sent back to back
        log.debug("could not pause the scheduler", exc_info=True)
    try:
        yield
    finally:
        if paused:
            await asyncio.shield(core.resume_scheduler_async())


class RequestQueue:
    """The queue `AsyncLLM` fills with one request's outputs (vLLM's `RequestOutputCollector`, what
    `add_request` returns; `generate` reads it the same way)."""

    def __init__(self, collector: Any) -> None:
        self._collector = collector

    async def next_output(self) -> Any:
        """The request's next `RequestOutput`, waiting for it; None where vLLM ended the stream
        without one (`STREAM_FINISHED`)."""
        output = self._collector.get_nowait() or await self._collector.get()
        return None if output is STREAM_FINISHED else output

    def close(self) -> None:
        self._collector.close()


async def add_request(llm: Any, request_id: str, prompt: Any, params: Any, priority: int = 0) -> RequestQueue:
    """Add a request to `llm` (an `AsyncLLM`) without reading it: its outputs arrive in the queue.
    `priority` orders it among waiting requests under the engine's `priority` scheduling policy."""
    return RequestQueue(await llm.add_request(request_id, prompt, params, priority=priority))


def engine_core_processes(llm: Any) -> list[Any]:
    """The engine-core processes `llm` (an `AsyncLLM`) started: vLLM's `CoreEngineProcManager`'s
    multiprocessing processes, children of this one, whose `is_alive()` sees a death at once; []
    where it started none of its own (Ray actors).

    vLLM's own monitor waits on their sentinels; after a SIGKILL it was measured to flag the engine
    dead seconds late, while /health (reading `errored`) still answered 200."""
    resources = getattr(llm.engine_core, "resources", None)
    manager = resources.engine_manager if resources is not None else None
    return list(getattr(manager, "processes", None) or [])


def memoize_logprob_token_texts() -> None:
    """Keep each token id's text once per tokenizer where vLLM's logprobs processor asks for it.

    vLLM turns every logprob entry's token id into its text with a tokenizer call of its own,
    in the API process's output handler, on the event loop (vllm/v1/engine/logprobs.py calls
    `convert_ids_list_to_tokens`): with `echo` and 20 logprobs, 43,000 calls for each 2,048-token
    prefill chunk, measured holding the loop for 0.35-0.63 s on this project's CPU host. A token
    id's text alone never depends on its neighbours (the function decodes each id by itself), so
    each id is decoded once and then looked up; the answers are the function's own. Idempotent."""
    import vllm.v1.engine.logprobs as logprobs

    original = logprobs.convert_ids_list_to_tokens
    if getattr(original, "memoized", False):
        return
    texts: weakref.WeakKeyDictionary[Any, dict[int, str]] = weakref.WeakKeyDictionary()

    def convert_ids_list_to_tokens(tokenizer: Any, token_ids: list[int]) -> list[str]:
        known = texts.setdefault(tokenizer, {})
        missing = [t for t in dict.fromkeys(token_ids) if t not in known]
        if missing:
            known.update(zip(missing, original(tokenizer, missing), strict=True))
        return [known[t] for t in token_ids]

    convert_ids_list_to_tokens.memoized = True  # type: ignore[attr-defined]
    convert_ids_list_to_tokens.__wrapped__ = original  # type: ignore[attr-defined]
    logprobs.convert_ids_list_to_tokens = convert_ids_list_to_tokens


def recording_stat_logger(record: Callable[[Any, Any], None]) -> type:
    """A vLLM stat-logger class that hands every iteration's `SchedulerStats` and `IterationStats`
    (either may be None) to `record`, on the engine's output loop."""

    class _Collector(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            pass

        def record(
            self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0
        ) -> None:
            record(scheduler_stats, iteration_stats)

        def log_engine_initialized(self) -> None:
            pass

    return _Collector


def silent_prometheus_logger() -> type:
    """A `PrometheusStatLogger` that registers and records nothing.

    vLLM appends its Prometheus logger to the stat loggers unless one of them already is one; ours
    (server/ops/metrics.py) exports what we need under `ropeserve_` names, so vLLM's stays off.
    """

    class _SilentPrometheusStatLogger(PrometheusStatLogger):
        def __init__(self, vllm_config: Any, engine_indexes: list[int] | None = None) -> None:
            self.engine_indexes = engine_indexes or [0]

        def record(self, *args: Any, **kwargs: Any) -> None:
            pass

        def record_sleep_state(self, *args: Any, **kwargs: Any) -> None:
            pass

        def record_admission_rejection(self, *args: Any, **kwargs: Any) -> None:
            pass

        def log_engine_initialized(self) -> None:
            pass

        def log(self) -> None:
            pass

    return _SilentPrometheusStatLogger
