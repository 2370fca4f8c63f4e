"""Rows admitted together, so that vLLM's scheduler sees them in one step (NBCE's lockstep rows).

The scheduler is paused ("keep": running requests stay, nothing is stepped) for the few
milliseconds it takes to add the rows, then resumed; the rows enter the waiting queue together.
"""

from __future__ import annotations

import asyncio
from typing import Any

from server.engines.base import EngineDown, RowRequest, StepStream
from server.engines.vllm_admission import AdmittedRow, RowAdmission
from server.engines.vllm_outputs import OutputReader


class RowGroups:
    """Admits row groups on a started `AsyncLLM`, one group at a time."""

    def __init__(self, llm: Any, admission: RowAdmission, outputs: OutputReader) -> None:
        self.llm = llm
        self.admission = admission
        self.outputs = outputs
        self._lock = asyncio.Lock()

    async def admit(self, rows: list[RowRequest]) -> list[StepStream]:
        """One step stream per row; closing a stream aborts its row. If any row cannot be added,
        none stays in the engine. The engine's death is EngineDown, here and in the streams."""
        from server.engines.vllm_adapter.engine import EngineDeadError

        try:
            return await self._admit(rows)
        except EngineDeadError as exc:
            raise EngineDown(f"the engine died while admitting this request's rows ({exc}); retry later") from exc

    async def _admit(self, rows: list[RowRequest]) -> list[StepStream]:
        from server.engines.vllm_adapter.engine import RequestQueue, add_request, scheduler_paused

        added: list[tuple[RequestQueue, AdmittedRow]] = []
        async with self._lock, scheduler_paused(self.llm):
            try:
                for row in rows:
                    admitted = self.admission.admit(row)
                    try:
                        queue = await add_request(
                            self.llm, row.request_id, admitted.prompt, admitted.sampling, row.priority
                        )
                    except BaseException:
                        self.admission.release(admitted)
                        raise
                    added.append((queue, admitted))
            except BaseException:
                await asyncio.shield(self.llm.abort([r.request_id for r in rows]))
                for _, admitted in added:
                    self.admission.release(admitted)
                raise
        return [self._follow(queue, admitted) for queue, admitted in added]

    async def _follow(self, queue: Any, admitted: AdmittedRow) -> StepStream:
        from server.engines.vllm_adapter.engine import EngineDeadError

        try:
            while (output := await queue.next_output()) is not None:
                yield self.outputs.step(output, admitted.row)
                if output.finished:
                    break
        except EngineDeadError as exc:  # nothing left to abort
            raise EngineDown(f"the engine died while serving this request ({exc}); retry later") from exc
        except BaseException:  # closed early (GeneratorExit), cancelled, or failed: free the row
            await asyncio.shield(self.llm.abort(admitted.request_id))
            raise
        finally:
            queue.close()
            self.admission.release(admitted)
