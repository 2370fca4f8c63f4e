"""Shared base of the RoPE-scaling strategies (`linear`, `ntk`, `dynamic_ntk`, `yarn`, `llama3`).

A RoPE strategy maps a request to one complete `rope_parameters` dict plus the longest total
length (prompt + max_new_tokens) it allows: `factor` x the model's native window, capped by what
the server's engine holds (`ModelFacts.max_context_tokens`). The one engine serves every
configuration, each in a slot of its cos/sin table (server/engines/rope_slots.py); `max_model_len`
of a configuration is the allowed length, and its slot's rows cover it.

Measured on the bundled SmolLM2-135M-Instruct (native window 8192, see README "Strategies"), the
defaults below are the factors that retrieved a passkey reliably; `suggest_rope_strategy` gives
the best measured strategy with the smallest sufficient factor (the native refusal's hint; `auto`
raises the factor to its `rope_factor`).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import replace
from typing import Any, TypeVar

from pydantic import Field

from server.attention.logn import LogN
from server.plan import ModelFacts, RopeConfig
from strategies.base import ExecutionPlan, PlanContext, Strategy, StrategyParams, StrategyRequest, check_fits

# Upper bound of every `factor`: 16 x 8192 = 131072 positions. What the machine can actually hold
# is narrower and checked per request against ModelFacts.max_context_tokens (the KV cache).
MAX_FACTOR = 16.0

# Preferred order when suggesting a strategy for a prompt too long for the native window: passkeys
# retrieved at 12k/16k/24k with 2 keys per cell (README "Strategies"), best first. The 5-key run
# agrees on the first place (dynamic_ntk 13/15) but ranks the rest llama3 12, ntk 9, yarn 8.
SUGGESTION_ORDER = ("dynamic_ntk", "yarn", "llama3", "ntk", "linear")


def factor_field(default: float) -> Any:
    return Field(
        default=default,
        ge=1.0,
        le=MAX_FACTOR,
        description="context stretch: the strategy allows factor x the native window "
        "(prompt + max_new_tokens), capped by the server's KV cache",
    )


def logn_field(default: bool) -> Any:
    return Field(
        default=default,
        description="log-n attention scaling: queries past the native window L0 are scaled by ln(i + 1) / ln L0",
    )


class RopeParams(StrategyParams):
    factor: float = factor_field(2.0)
    logn: bool = logn_field(False)


def allowed_tokens(factor: float, model: ModelFacts) -> int:
    """factor x native window, capped by the KV cache of one engine."""
    allowed = int(math.floor(factor * model.native_window))
    cap = getattr(model, "max_context_tokens", None)
    return min(allowed, cap) if cap else allowed


def smallest_power_of_two_factor(needed_tokens: int, native_window: int) -> float:
    """The smallest factor in 1, 2, 4, 8, 16 whose window holds `needed_tokens`."""
    factor = 1.0
    while factor * native_window < needed_tokens and factor < MAX_FACTOR:
        factor *= 2
    return factor


def ntk_theta(theta: float, factor: float, dim: int) -> float:
    """NTK-aware base change: theta' = theta * factor^(d / (d - 2))."""
    return float(theta) * math.pow(factor, dim / (dim - 2))


def suggest_rope_strategy(needed_tokens: int, model: ModelFacts, name: str | None = None) -> dict[str, Any] | None:
    """A strategy spec for a too-long prompt: the best measured scaling, smallest sufficient factor.

    Returns None when the request fits natively (use `native`) or when no RoPE configuration the
    server can hold fits (then only NBCE-style chunking can serve it).
    """
    if needed_tokens <= model.native_window:
        return None
    cap = getattr(model, "max_context_tokens", None)
    if cap and needed_tokens > cap:
        return None
    chosen = name or SUGGESTION_ORDER[0]
    return {"name": chosen, "factor": smallest_power_of_two_factor(needed_tokens, model.native_window)}


def longer_context_hint(needed_tokens: int, model: ModelFacts) -> str:
    """The sentence a refusal carries: which strategies would fit this request."""
    cap = getattr(model, "max_context_tokens", None)
    if cap and needed_tokens > cap:
        return (
            f"No RoPE scaling fits: this server's KV cache holds at most {cap} tokens per request; "
            "shorten the prompt or use a chunked strategy such as 'nbce' if available"
        )
    factor = smallest_power_of_two_factor(needed_tokens, model.native_window)
    if factor * model.native_window < needed_tokens:
        return "No RoPE scaling fits: the prompt is longer than the largest factor allows"
    shown = f"{factor:g}"
    names = ", ".join(f"'{n}'" for n in SUGGESTION_ORDER)
    return (
        f"Strategies that fit: {names} with factor >= {shown}, e.g. "
        f'"strategy": {{"name": "{SUGGESTION_ORDER[0]}", "factor": {shown}}}'
    )


RP = TypeVar("RP", bound=RopeParams)


class RopeStrategy(Strategy[RP]):
    """One static RoPE scaling: a complete rope_parameters dict and factor x native window."""

    @abstractmethod
    def rope_parameters(self, model: ModelFacts) -> dict[str, Any]:
        """The complete rope_parameters dict (rope_type, rope_theta, ...) for the engine."""

    def max_total_tokens(self, model: ModelFacts) -> int:
        return allowed_tokens(self.params.factor, model)

    def rope_config(self, model: ModelFacts, request_tokens: int | None = None) -> RopeConfig:
        return RopeConfig.from_dict(self.rope_parameters(model), self.max_total_tokens(model))

    def base_parameters(self, model: ModelFacts) -> dict[str, Any]:
        """The model's own rope parameters minus any scaling keys (the start of every dict)."""
        keep = ("rope_theta", "partial_rotary_factor")
        return {k: v for k, v in model.rope_parameters.items() if k in keep} | {"rope_theta": float(model.rope_theta)}

    def plan(self, request: StrategyRequest, context: PlanContext) -> ExecutionPlan:
        model = context.model
        row = request.plain_prompt_ids()
        needed = len(row) + request.max_new_tokens
        limit = self.max_total_tokens(model)
        hint = "" if needed <= limit else self._hint(needed, model)
        check_fits(len(row), request.max_new_tokens, limit, self.name, hint)
        rope = self.rope_config(model, self.config_tokens(request, needed, context))
        if self.params.logn and needed > model.native_window and not rope.is_native:
            # Scales only positions past L0 (s(i) = 1 below), so shorter requests need no scheme.
            rope = replace(rope, attention=LogN(window=model.native_window))
        return ExecutionPlan(
            rope=rope,
            rows=[row],
            max_total_tokens=limit,
            resolved=self.resolved(),
        )

    def config_tokens(self, request: StrategyRequest, needed: int, context: PlanContext) -> int:
        """The length the RoPE configuration is chosen for (the request's own, unless a strategy
        whose configuration follows the length says otherwise)."""
        return needed

    def _hint(self, needed: int, model: ModelFacts) -> str:
        cap = getattr(model, "max_context_tokens", None)
        if cap and needed > cap:
            return longer_context_hint(needed, model)
        factor = smallest_power_of_two_factor(needed, model.native_window)
        return f'Raise the factor, e.g. {{"name": "{self.name}", "factor": {factor:g}}}'
