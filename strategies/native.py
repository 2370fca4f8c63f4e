"""`native`: the model as trained, no position scaling."""

from __future__ import annotations

from strategies.base import (
    ExecutionPlan,
    ModelFacts,
    RopeConfig,
    Strategy,
    StrategyParams,
    StrategyRequest,
    Tokenize,
    check_fits,
)

from strategies.rope import longer_context_hint

# Generic fallback; the refusal names the strategies and factor that would fit (strategies.rope).
LONGER_CONTEXT_HINT = "Choose a long-context strategy (see GET /strategies) for longer prompts"


class NativeParams(StrategyParams):
    pass


class NativeStrategy(Strategy):
    name = "native"
    description = "The model's own RoPE; prompts must fit its native context window."
    Params = NativeParams

    def plan(self, request: StrategyRequest, model: ModelFacts, tokenize: Tokenize) -> ExecutionPlan:
        row = tokenize(request.plain_prompt())
        needed = len(row) + request.max_new_tokens
        hint = longer_context_hint(needed, model) if needed > model.native_window else ""
        check_fits(len(row), request.max_new_tokens, model.native_window, self.name, hint)
        return ExecutionPlan(
            rope=RopeConfig.native(),
            rows=[row],
            max_total_tokens=model.native_window,
            resolved=self.resolved(),
        )
