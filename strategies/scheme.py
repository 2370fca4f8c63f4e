"""Shared base of the strategies that are one attention scheme over the model's own RoPE and serve
any length the KV cache holds (`dca`, `string`): the scheme bounds every distance a score sees, so no
factor limits the length.

A request the scheme leaves as plain attention (every pair inside DCA's first chunk, or STRING's
near band with no attention factor) is planned `native`, bit for bit.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, TypeVar

from server.plan import AttentionScheme, ModelFacts, RopeConfig
from strategies.base import (
    ExecutionPlan,
    PlanContext,
    Strategy,
    StrategyError,
    StrategyParams,
    StrategyRequest,
    check_fits,
)

SP = TypeVar("SP", bound=StrategyParams)


def require(holds: bool, field: str, message: str) -> None:
    """Refuse the request's `strategy.<field>` with `message` unless `holds`."""
    if not holds:
        raise StrategyError(f"strategy.{field}: {message}", field=f"strategy.{field}")


class SchemeStrategy(Strategy[SP]):
    @abstractmethod
    def scheme(self, model: ModelFacts) -> AttentionScheme:
        """The scheme for `model`: the client's values, defaults derived from the model for the rest
        (raises StrategyError for values the model cannot take)."""

    @abstractmethod
    def is_plain(self, scheme: AttentionScheme, needed: int) -> bool:
        """Whether a request of `needed` tokens is plain RoPE attention under `scheme`."""

    @abstractmethod
    def settings(self, scheme: AttentionScheme) -> dict[str, Any]:
        """The values used, for the response's `strategy`."""

    def plan(self, request: StrategyRequest, context: PlanContext) -> ExecutionPlan:
        model = context.model
        scheme = self.scheme(model)
        row = request.plain_prompt_ids()
        limit = model.max_context_tokens or 16 * model.native_window
        check_fits(len(row), request.max_new_tokens, limit, self.name)
        plain = self.is_plain(scheme, len(row) + request.max_new_tokens)
        rope = RopeConfig.native() if plain else RopeConfig((), limit, scheme)
        resolved = {"name": self.name, **self.settings(scheme)}
        return ExecutionPlan(rope=rope, rows=[row], max_total_tokens=limit, resolved=resolved)
