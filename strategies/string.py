"""`string`: STRING (An et al. 2024, "Why Does the Effective Context Length of LLMs Fall Short?",
HKUNLP/STRING): the relative positions pretraining saw least, the largest, are dropped and the
well-trained ones shifted over them — inside the model's window as well as past it.

A pair at distance d is scored at d while d < S, at d - S + W beyond (S the shifted offset, W the
small local value the shifted part starts from; server/attention/string.py has the rule and its
source), and never past the cap C: distances whose shifted position would pass C are scored at C,
as ReRoPE clamps. The default cap is the largest position STRING itself uses at the trained length
L, C = L - 1 - S + W, so inside the window the cap is never reached (the paper's rule, exactly) and
past it no score sees a position STRING would not use at L: a row may be as long as the KV cache
holds. Every logit is scaled by STRING's attention factor squared (0.1 ln 2 + 1, as its code scales
every cos/sin). Defaults from the paper: S = 0.33 L, W = 128.

    >>> from strategies.base import PlanContext, PromptTokens, StrategyRequest
    >>> from strategies.registry import default_registry
    >>> from server.plan import ModelFacts
    >>> registry = default_registry()
    >>> model = ModelFacts("m", native_window=8192, rope_parameters={"rope_theta": 1e5}, head_dim=64,
    ...                    vocab_size=100, max_context_tokens=65536)
    >>> request = StrategyRequest("q", tokens=PromptTokens((1,) * 7_000))
    >>> plan = registry.resolve("string").plan(request, PlanContext(model, registry))
    >>> plan.rope.label(), plan.max_total_tokens
    ('native+string-s2703-w128-c5616', 65536)
    >>> plan.resolved
    {'name': 'string', 'shift': 2703, 'local_window': 128, 'cap': 5616, 'attention_factor': 1.0693...}
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, ValidationInfo, field_validator, model_validator

from server.attention.string import PAPER_ATTENTION_FACTOR, String
from server.plan import AttentionScheme, ModelFacts
from strategies.base import StrategyParams
from strategies.scheme import SchemeStrategy, require
from strategies.window import MAX_WINDOW, MIN_WINDOW

PAPER_SHIFT_RATIO = 0.33
PAPER_LOCAL_WINDOW = 128


class StringParams(StrategyParams):
    shift: int | None = Field(
        default=None,
        ge=MIN_WINDOW,
        le=MAX_WINDOW,
        description="S: distances from S on are shifted down to W (< the native window); default 0.33 x the "
        "native window (the paper's)",
    )
    local_window: int | None = Field(
        default=None,
        ge=1,
        le=MAX_WINDOW,
        description="W: the position the shifted distances start from (< S); default 128 (the paper's)",
    )
    cap: int | None = Field(
        default=None,
        ge=2,
        le=MAX_WINDOW,
        description="C: no pair is scored past it (< the native window); default L - 1 - S + W, the largest "
        "position STRING uses at the native window L",
    )
    attention_factor: float = Field(
        default=PAPER_ATTENTION_FACTOR,
        ge=0.5,
        le=2.0,
        description="every cos/sin scaled by it, every logit by its square; default 0.1 ln 2 + 1 (the paper's "
        "code); 1: off",
    )

    @model_validator(mode="after")
    def _local_window_below_the_shift(self) -> StringParams:
        if self.shift is not None and self.local_window is not None and self.local_window >= self.shift:
            raise ValueError(f"local_window ({self.local_window}) must be < shift ({self.shift})")
        return self

    @field_validator("cap")
    @classmethod
    def _capped_band_not_narrow(cls, cap: int | None, info: ValidationInfo) -> int | None:
        """The shifted band is cap - local_window wide, and the kernel's query blocks are no wider
        than the narrowest band (as a window strategy's `window`: strategies/window.py MIN_WINDOW)."""
        local_window = info.data.get("local_window") or PAPER_LOCAL_WINDOW
        if cap is not None and cap - local_window < MIN_WINDOW:
            raise ValueError(f"cap - local_window ({cap} - {local_window}) must be >= {MIN_WINDOW}")
        return cap


class StringStrategy(SchemeStrategy[StringParams]):
    name = "string"
    description = (
        "STRING: distances past an offset S are shifted onto well-trained positions from W on, capped at "
        "C (attention computed by the engine from the cached keys); inside the window and past it."
    )
    Params = StringParams

    def scheme(self, model: ModelFacts) -> String:
        """S, W and C: the given values, the paper's defaults for the rest."""
        window = model.native_window
        shift = self.params.shift or int(PAPER_SHIFT_RATIO * window)
        local_window = self.params.local_window or min(PAPER_LOCAL_WINDOW, shift - 1)
        cap = self.params.cap or window - 1 - shift + local_window
        require(shift < window, "shift", f"{shift} must be < the model's native window ({window})")
        require(cap < window, "cap", f"{cap} must be < the model's native window ({window})")
        require(local_window < shift, "local_window", f"{local_window} must be < shift ({shift})")
        require(cap > local_window, "cap", f"{cap} must be > local_window ({local_window})")
        return String(shift=shift, local_window=local_window, cap=cap, attention_factor=self.params.attention_factor)

    def is_plain(self, scheme: AttentionScheme, needed: int) -> bool:
        assert isinstance(scheme, String)
        return needed <= scheme.shift and scheme.attention_factor == 1.0  # the near band, unscaled

    def settings(self, scheme: AttentionScheme) -> dict[str, Any]:
        assert isinstance(scheme, String)
        return {
            "shift": scheme.shift,
            "local_window": scheme.local_window,
            "cap": scheme.cap,
            "attention_factor": scheme.attention_factor,
        }
