"""The measured policy `auto` follows (written by `ropeserve eval --write-policy`).

Per length band, the strategies ranked by their measured accuracy on this model; a request of `n`
tokens (prompt + max_new_tokens) takes the first band with `up_to_tokens >= n`, and in it the
first strategy that applies (NBCE only with a `context`). The shipped policy
(`strategies/auto_policy.json`) was measured on the bundled SmolLM2-135M-Instruct; the server
loads it only for that model (settings: `auto_policy`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

SHIPPED_POLICY = Path(__file__).with_name("auto_policy.json")


class RankedChoice(BaseModel):
    strategy: dict[str, Any]
    label: str
    score: float = Field(ge=0.0, le=1.0)
    seconds: float = Field(default=0.0, ge=0.0)
    # The cells that ranked it: task -> "correct/trials" or "mean of trials", at the band's length.
    tasks: dict[str, str] = Field(default_factory=dict)
    # What those tasks read (e.g. "varied text (Austen's novels)"); the reason names it.
    measured_on: str = ""
    # Mean perplexity past the native window up to the band's length (None: not measured); it
    # breaks ties in accuracy.
    perplexity_past_window: float | None = Field(default=None, gt=0.0)


class Band(BaseModel):
    up_to_tokens: int = Field(ge=1)
    ranked: list[RankedChoice] = Field(min_length=1)


class AutoPolicy(BaseModel):
    model: str
    native_window: int
    source: str = ""
    bands: list[Band]
    # Where it was loaded from (for the response's `reason`).
    path: str = ""

    def band_for(self, tokens: int) -> Band | None:
        return next((b for b in sorted(self.bands, key=lambda b: b.up_to_tokens) if b.up_to_tokens >= tokens), None)


def load_policy(path: str | Path) -> AutoPolicy:
    policy = AutoPolicy.model_validate(json.loads(Path(path).read_text()))
    policy.path = str(path)
    return policy
