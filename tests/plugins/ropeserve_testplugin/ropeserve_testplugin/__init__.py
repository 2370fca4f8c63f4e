"""Third-party strategies registered through the `ropeserve.strategies` entry point.

- `shifted_theta`: a RoPE scaling (the RoPE base multiplied by a constant);
- `per_document`: a multi-row strategy with its own combiner — one row per document (document,
  blank line, question), answered one after the other and streamed as one answer. It proves that
  a plugin adds a multi-row strategy without touching the server.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import Field

from server.engines.base import Engine, EngineStep, RowJob, RowRequest, StepStream
from server.plan import ModelFacts
from strategies.base import (
    DOCUMENT_SEPARATOR,
    ExecutionPlan,
    PlanContext,
    PromptTokens,
    Strategy,
    StrategyError,
    StrategyParams,
    StrategyRequest,
)
from strategies.rope import RopeParams, RopeStrategy


class ShiftedThetaParams(RopeParams):
    theta_multiplier: float = Field(default=8.0, ge=1.0, le=64.0)


class ShiftedThetaStrategy(RopeStrategy[ShiftedThetaParams]):
    name = "shifted_theta"
    description = "Test plugin: RoPE base multiplied by a constant."
    Params = ShiftedThetaParams

    def rope_parameters(self, model: ModelFacts) -> dict[str, Any]:
        theta = model.rope_theta * self.params.theta_multiplier
        return {**self.base_parameters(model), "rope_type": "default", "rope_theta": theta}


@dataclass(frozen=True)
class OneAfterAnother:
    """A `RowCombiner`: every row in turn, each one's tokens streamed as they come."""

    name: str = "one_after_another"

    async def run(self, engine: Engine, job: RowJob) -> StepStream:
        prompt_tokens = job.plan.prompt_tokens
        for k, row in enumerate(job.plan.rows):
            stream = engine.generate(RowRequest(f"{job.request_id}:{k}", row, job.sampling, job.plan.rope))
            try:
                async for step in stream:
                    last = k == len(job.plan.rows) - 1
                    yield EngineStep(
                        step.tokens,
                        step.text,
                        step.finished and last,
                        step.finish_reason if last else None,
                        prompt_tokens,
                    )
            finally:
                await stream.aclose()


class PerDocumentParams(StrategyParams):
    rope: str = Field(default="native", description="the strategy each document's row is planned with")


class PerDocumentStrategy(Strategy[PerDocumentParams]):
    name = "per_document"
    description = "Test plugin: the question answered for each document in turn, one answer after the other."
    Params = PerDocumentParams

    def plan(self, request: StrategyRequest, context: PlanContext) -> ExecutionPlan:
        if not request.documents:
            raise StrategyError("context: per_document needs a list of documents", field="context")
        tokens, rope = request.prompt_tokens(), context.resolve(self.params.rope)
        plans = []
        for text, document in zip(request.documents, tokens.documents, strict=True):
            # The row reads the document, a blank line and the question: the document's ids, then
            # the question's (PromptTokens.after), planned as a prompt of its own.
            row = PromptTokens(tuple(tokens.after(document.ids)))
            text = text + DOCUMENT_SEPARATOR + request.inputs
            plans.append(rope.plan(StrategyRequest(text, max_new_tokens=request.max_new_tokens, tokens=row), context))
        return ExecutionPlan(
            rope=plans[0].rope,
            rows=[p.rows[0] for p in plans],
            max_total_tokens=min(p.max_total_tokens for p in plans),
            resolved={**self.resolved(), "rows": len(plans)},
            combiner=OneAfterAnother(),
        )
