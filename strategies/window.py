"""Shared base of the window strategies (`rerope`, `leaky_rerope`, `self_extend`).

They keep exact relative positions inside a window and clamp (ReRoPE), compress (Leaky ReRoPE)
or group (Self-Extend) them beyond it, so no score sees a distance the model was not trained on
(one scheme file each in server/attention/ has the formulas; docs/design/window-attention.md the
sources). The engine computes such rows' attention itself from the cached keys; a request
whose whole length fits in the window is plain RoPE attention, so it is planned as `native` and
is exactly native. Parameters a client leaves out are derived from the model's window: the papers'
values are for a 4k Llama-2, and were measured too small on the bundled model (README *Window
strategies*).

    >>> from strategies.base import PlanContext, PromptTokens, StrategyRequest
    >>> from strategies.registry import default_registry
    >>> from server.plan import ModelFacts
    >>> registry = default_registry()
    >>> model = ModelFacts("m", native_window=8192, rope_parameters={"rope_theta": 1e5}, head_dim=64,
    ...                    vocab_size=100, max_context_tokens=32768)
    >>> request = StrategyRequest("q", tokens=PromptTokens((1,) * 20_000))
    >>> plan = registry.resolve("rerope").plan(request, PlanContext(model, registry))
    >>> plan.rope.label(), plan.max_total_tokens, plan.resolved
    ('native+rerope-w4096-logn', 32768, {'name': 'rerope', 'window': 4096, 'logn': True})
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, TypeVar

from pydantic import Field

from server.attention.banded import TwoBandScheme
from server.plan import ModelFacts, RopeConfig
from strategies.base import (
    ExecutionPlan,
    PlanContext,
    Strategy,
    StrategyError,
    StrategyParams,
    StrategyRequest,
    check_fits,
)

# Longest window a request may ask for (16 x the bundled model's native window); each strategy
# also needs window < the model's native window, checked per model when planning.
MAX_WINDOW = 131072
# Shortest window a request may ask for: the kernel works in query blocks of at most the window,
# so a window of 1 made a 3,300-token request 2.5x as long as a window of 1,024 (30.6 s against
# 12.2 s); from 128 up, windows cost within 1.03x of the default at 6,000 tokens (docs/benchmarks.md,
# "Costly strategy parameters").
MIN_WINDOW = 128


def window_field(description: str) -> Any:
    return Field(default=None, ge=MIN_WINDOW, le=MAX_WINDOW, description=description)


class WindowParams(StrategyParams):
    window: int | None
    logn: bool


WP = TypeVar("WP", bound=WindowParams)


class WindowStrategy(Strategy[WP]):
    """One window scheme: exact positions inside `window`, the scheme's own beyond it."""

    @abstractmethod
    def settings(self, model: ModelFacts, needed: int) -> WP:
        """The parameters for `model` and a request of `needed` tokens: the client's, with what it
        left out derived from the model's window (and, where the paper sizes it so, the length)."""

    @abstractmethod
    def scheme(self, p: WP, model: ModelFacts) -> TwoBandScheme:
        """The attention scheme the engine runs (logn_window set when `logn`)."""

    @abstractmethod
    def longest(self, p: WP, model: ModelFacts) -> int | None:
        """The longest row whose farthest relative position stays within the native window
        (None: any length)."""

    def max_total_tokens(self, p: WP, model: ModelFacts) -> int:
        limits = [n for n in (self.longest(p, model), model.max_context_tokens) if n is not None]
        return min(limits) if limits else 16 * model.native_window

    def plan(self, request: StrategyRequest, context: PlanContext) -> ExecutionPlan:
        model = context.model
        row = request.plain_prompt_ids()
        needed = len(row) + request.max_new_tokens
        p = self.settings(model, needed)
        assert p.window is not None  # settings() fills it
        if p.window >= model.native_window:
            raise StrategyError(
                f"strategy.window: {p.window} must be < the model's native window ({model.native_window})",
                field="strategy.window",
            )
        limit = self.max_total_tokens(p, model)
        check_fits(len(row), request.max_new_tokens, limit, self.name)
        # Every pair inside the window is plain RoPE attention: served as native (bitwise).
        rope = RopeConfig.native() if needed <= p.window else RopeConfig((), limit, self.scheme(p, model))
        return ExecutionPlan(
            rope=rope, rows=[row], max_total_tokens=limit, resolved={"name": self.name, **p.model_dump()}
        )

    @staticmethod
    def logn_window(p: WindowParams, model: ModelFacts) -> int | None:
        return model.native_window if p.logn else None
