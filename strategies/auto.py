"""`auto`: pick the strategy by length.

With a measured policy (strategies/auto_policy.py; the server loads the shipped one for the
bundled model), the request's length (prompt + max_new_tokens) selects a band and the band's best
measured strategy that applies is used (its factor raised if the request needs more); the
response says which band and which scores chose it. Without a policy, or past its last band:

* the plain prompt (documents, blank line, question) plus max_new_tokens fits the native window
  → `native`;
* else, up to `max_rope_factor` × the window (and within what the KV cache holds) → the RoPE
  scaling the RoPE measurements rank best (`dynamic_ntk`, factor `rope_factor`), or the smallest
  sufficient power-of-two factor if that is larger;
* beyond that → `nbce` over chunks that fit the native window (it needs a `context`; a prompt
  that is all `inputs` gets the RoPE scaling while one fits, else the 422 of the chosen strategy).

A scoring request (the client reads the prompt's own log-probabilities: `echo`,
`decoder_input_details`) past the native window gets the first of `scoring` the engine serves
instead: the window strategies, which score text past the window best (perplexity:
docs/evaluation.md, "Perplexity past the window"). Which the engine serves is the engine's to say:
the plan is the first of `scoring` that plans, with the others and the plan by length as its
fallbacks (ExecutionPlan.fallbacks), and the service runs the first of them the engine serves.

`rope` and `scoring` name strategies of the server's registry; they are checked on every request,
used or not (errors name `strategy.rope`, `strategy.scoring[i]`). A request that chooses its RoPE
scaling (`rope` or `rope_factor`) is planned by the thresholds: the measured policy would choose
another one.

The response's `strategy` field says what was chosen and why: `{"name": "auto", "chosen": {...},
"reason": "..."}`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from pydantic import Field

from server.plan import ModelFacts
from strategies.auto_policy import AutoPolicy
from strategies.base import (
    ExecutionPlan,
    PlanContext,
    Strategy,
    StrategyError,
    StrategyParams,
    StrategyRequest,
    StrategySpec,
)
from strategies.rope import SUGGESTION_ORDER, RopeStrategy, smallest_power_of_two_factor, suggest_rope_strategy

# Passkey measurements on the bundled model (README "Strategies", 5 keys per cell at 12k/16k/24k):
# dynamic_ntk 13/15, llama3 12/15, ntk at the smallest factor 9/15 (it retrieves only well inside
# its stretched window), yarn 8/15; with 2 keys, ntk x8 4/6 and linear 0/6. So: dynamic_ntk, whose
# base follows each request's length and which alone stays at 4/5 or better at every length, up to
# 3 x the window; longer prompts go to NBCE, whose cost grows linearly with
# the length and whose rows stay inside the trained window.
DEFAULT_MAX_ROPE_FACTOR = 3.0
DEFAULT_ROPE_FACTOR = 8.0

# Perplexity by position past the native window (README "Window strategies", 16k tokens of Pride and
# Prejudice; mean over 8k-15k): self_extend W=2048 G=4 21.27, rerope w=4096 21.43, leaky_rerope
# 21.45, yarn x2 21.69, dynamic_ntk 22.54; inside the window they are the model's own (19.80 against
# dynamic_ntk's 20.78). self_extend at W=2048, G=4 reaches 26,624 tokens; rerope any length.
DEFAULT_SCORING: tuple[dict[str, Any], ...] = (
    {"name": "self_extend", "window": 2048, "group": 4},
    {"name": "rerope", "window": 4096},
)


class AutoParams(StrategyParams):
    max_rope_factor: float = Field(
        default=DEFAULT_MAX_ROPE_FACTOR,
        ge=1.0,
        le=16.0,
        description="longest stretch (x native window) served by RoPE scaling; longer prompts use nbce",
    )
    rope: str | None = Field(
        default=None,
        description="RoPE strategy to use (default: the best measured, strategies.rope.SUGGESTION_ORDER); "
        "given, or with rope_factor, the thresholds choose, not the measured policy",
    )
    rope_factor: float = Field(
        default=DEFAULT_ROPE_FACTOR,
        ge=1.0,
        le=16.0,
        description="factor of that RoPE scaling (dynamic_ntk: its cap); raised to the smallest sufficient one "
        "if a prompt needs more",
    )
    use_policy: bool = Field(
        default=True, description="follow the server's measured policy where it has one for this length"
    )
    scoring: list[dict[str, Any]] = Field(
        default_factory=lambda: [dict(spec) for spec in DEFAULT_SCORING],
        max_length=8,
        description="for a scoring request (echo / prompt logprobs) past the native window: strategies tried in "
        "order, the first that plans and that the engine serves is used (measured: lowest perplexity first); "
        "[]: score like any request",
    )


def _resolve_named(context: PlanContext, spec: StrategySpec, where: str) -> Strategy[Any]:
    """`spec` resolved in the server's registry; its refusal names `where` (not `strategy`)."""
    try:
        return context.resolve(spec)
    except StrategyError as exc:
        raise StrategyError(where + exc.message.removeprefix("strategy")) from None


class AutoStrategy(Strategy[AutoParams]):
    name = "auto"
    description = (
        "the best strategy measured for the request's length (strategies/auto_policy.json: varied-text tasks, "
        "band by band); without a policy band: native in the window, a RoPE scaling, then nbce; a scoring "
        "request (echo) past the window: a window strategy."
    )
    Params = AutoParams

    def plan(self, request: StrategyRequest, context: PlanContext) -> ExecutionPlan:
        self._check_strategies(context)
        needed = len(request.plain_prompt_ids()) + request.max_new_tokens
        scoring = []
        if request.scoring and needed > context.model.native_window:
            scoring = self._scoring_plans(request, context, needed)
        try:
            by_length = self._plan_by_length(request, context, needed)
        except StrategyError:
            if not scoring:
                raise
            return _with_fallbacks(scoring)
        return _with_fallbacks([*scoring, by_length])

    def _plan_by_length(self, request: StrategyRequest, context: PlanContext, needed: int) -> ExecutionPlan:
        """The measured policy's choice for this length, else the thresholds'."""
        model, p = context.model, self.params
        policy = context.options.get("auto_policy")
        if p.use_policy and not self._rope_chosen() and isinstance(policy, AutoPolicy):
            planned = self._follow_policy(policy, request, context, needed)
            if planned is not None:
                return planned
        spec: StrategySpec
        if needed <= model.native_window:
            spec, reason = (
                "native",
                f"{needed} tokens (prompt + max_new_tokens) fit the native window of {model.native_window}",
            )
        else:
            suggestion = self._rope_suggestion(needed, model, p)
            has_context = any(d.strip() for d in request.documents)
            if suggestion is not None and (needed <= p.max_rope_factor * model.native_window or not has_context):
                spec = suggestion
                why = (
                    f"within max_rope_factor {p.max_rope_factor:g} x the window"
                    if needed <= p.max_rope_factor * model.native_window
                    else "beyond max_rope_factor, but there is no context to split for nbce"
                )
                reason = (
                    f"{needed} tokens exceed the native window of {model.native_window}; "
                    f"'{suggestion['name']}' with factor {suggestion['factor']:g}, {why}"
                )
            elif has_context:
                spec = {"name": "nbce"}
                reason = (
                    f"{needed} tokens exceed what RoPE scaling serves well here "
                    f"({p.max_rope_factor:g} x {model.native_window}); nbce over chunks of the native window"
                )
            else:
                raise StrategyError(
                    f"inputs: the prompt needs {needed} tokens, more than RoPE scaling can hold here, and "
                    "there is no context to split for nbce; pass the document as `context`",
                    field="inputs",
                )
        plan = context.resolve(spec).plan(request, context)
        plan.resolved = {"name": self.name, "chosen": plan.resolved, "reason": reason}
        return plan

    def _rope_chosen(self) -> bool:
        """The request names its RoPE scaling (`rope` or `rope_factor`)."""
        return self.params.rope is not None or "rope_factor" in self.params.model_fields_set

    def _check_strategies(self, context: PlanContext) -> None:
        """`rope` and every `scoring` spec resolve in the server's registry, used or not."""
        p = self.params
        if p.rope is not None:
            if not isinstance(_resolve_named(context, p.rope, "strategy.rope"), RopeStrategy):
                raise StrategyError(
                    f"strategy.rope: '{p.rope}' is not a RoPE scaling with a factor (e.g. {', '.join(SUGGESTION_ORDER)})"
                )
            _resolve_named(context, {"name": p.rope, "factor": p.rope_factor}, "strategy.rope")
            if "use_policy" in p.model_fields_set and p.use_policy:
                raise StrategyError(
                    "strategy.use_policy: the measured policy chooses its own RoPE scaling; with `rope` or "
                    "`rope_factor` leave out use_policy (or set it false)"
                )
        for i, spec in enumerate(p.scoring):
            where = f"strategy.scoring[{i}]"
            if spec.get("name") in ("auto", "nbce"):
                raise StrategyError(
                    f"{where}: '{spec.get('name')}' does not score a prompt; name a single-row strategy"
                )
            _resolve_named(context, spec, where)

    def _follow_policy(
        self, policy: AutoPolicy, request: StrategyRequest, context: PlanContext, needed: int
    ) -> ExecutionPlan | None:
        """The band's best measured strategy that applies and fits; None: no band, or none fits."""
        band = policy.band_for(needed)
        if band is None:
            return None
        has_context = any(d.strip() for d in request.documents)
        for rank, choice in enumerate(band.ranked, start=1):
            spec = dict(choice.strategy)
            if spec.get("name") == "nbce" and not has_context:
                continue
            if isinstance(spec.get("factor"), (int, float)):
                spec["factor"] = max(
                    float(spec["factor"]), smallest_power_of_two_factor(needed, context.model.native_window)
                )
            try:
                plan = context.resolve(spec).plan(request, context)
            except StrategyError:
                continue
            measured = ", ".join(f"{task} {score}" for task, score in choice.tasks.items())
            if choice.perplexity_past_window is not None:
                measured += f", perplexity past the window {choice.perplexity_past_window:g}"
            plan.resolved = {
                "name": self.name,
                "chosen": plan.resolved,
                "reason": f"{needed} tokens fall in the measured band up to {band.up_to_tokens}; "
                f"'{choice.label}' ranks {rank} there, measured at {band.up_to_tokens} tokens"
                f"{' on ' + choice.measured_on if choice.measured_on else ''}: {measured} "
                f"(score {choice.score:g}; {policy.source or policy.path})",
                "policy": {"band_up_to_tokens": band.up_to_tokens, "rank": rank, "score": choice.score,
                           "tasks": choice.tasks, "measured_on": choice.measured_on,
                           "perplexity_past_window": choice.perplexity_past_window,
                           "source": policy.path},
            }  # fmt: skip
            return plan
        return None

    def _scoring_plans(self, request: StrategyRequest, context: PlanContext, needed: int) -> list[ExecutionPlan]:
        """The plans of `scoring` that plan one row for this request, in order."""
        plans = []
        for spec in self.params.scoring:
            strategy = context.resolve(spec)  # checked by _check_strategies
            try:
                plan = strategy.plan(request, context)
            except StrategyError:  # this request does not fit it: the next one
                continue
            if len(plan.rows) != 1:
                continue
            plan.resolved = {
                "name": self.name,
                "chosen": plan.resolved,
                "reason": f"a scoring request (prompt logprobs) of {needed} tokens, past the native window of "
                f"{context.model.native_window}; '{spec.get('name')}' scores text past the window best of those "
                "this engine serves (measured perplexity)",
            }
            plans.append(plan)
        return plans

    @staticmethod
    def _rope_suggestion(needed: int, model: ModelFacts, p: AutoParams) -> dict[str, Any] | None:
        suggestion = suggest_rope_strategy(needed, model, p.rope)
        if suggestion is not None:
            suggestion["factor"] = max(suggestion["factor"], p.rope_factor)
        return suggestion


def _with_fallbacks(plans: list[ExecutionPlan]) -> ExecutionPlan:
    """The first plan, the others its fallbacks in order (the service runs the first the engine serves)."""
    return replace(plans[0], fallbacks=tuple(plans[1:]))
