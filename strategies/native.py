"""`native`: the model as trained, no position scaling."""

from __future__ import annotations

from server.plan import RopeConfig
from strategies.base import ExecutionPlan, PlanContext, Strategy, StrategyParams, StrategyRequest, check_fits
from strategies.rope import longer_context_hint


class NativeParams(StrategyParams):
    pass


class NativeStrategy(Strategy[NativeParams]):
    name = "native"
    description = "The model's own RoPE; prompts must fit its native context window."
    Params = NativeParams

    def plan(self, request: StrategyRequest, context: PlanContext) -> ExecutionPlan:
        model = context.model
        row = request.plain_prompt_ids()
        needed = len(row) + request.max_new_tokens
        hint = longer_context_hint(needed, model) if needed > model.native_window else ""
        check_fits(len(row), request.max_new_tokens, model.native_window, self.name, hint)
        return ExecutionPlan(
            rope=RopeConfig.native(),
            rows=[row],
            max_total_tokens=model.native_window,
            resolved=self.resolved(),
        )
