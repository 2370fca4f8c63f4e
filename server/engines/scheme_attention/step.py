"""Which rows of the model step being run use which attention scheme.

The runner (server/engines/multi_rope/runner.py) publishes a `StepPlan` before each forward pass;
every attention layer's impl (impl.py) reads it. One engine-core worker runs one step at a time,
so a module-level value is enough.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from server.attention import scheme_from_spec
from server.plan import AttentionScheme

# SamplingParams.extra_args key carrying a row's scheme (`AttentionScheme.spec()`).
ATTENTION_EXTRA_KEY = "ropeserve_attention"


@dataclass(frozen=True)
class StepPlan:
    """Per scheduled row, in the batch order of the attention metadata: its scheme (or None) and
    the length its scheme sizes itself by (`AttentionScheme.query_scale`)."""

    schemes: tuple[AttentionScheme | None, ...]
    request_ids: tuple[str, ...]
    lengths: tuple[int, ...]
    # The model's native RoPE frequencies (schemes rotate queries and keys on with them).
    inv_freq: torch.Tensor
    # What the attention layers compute once per step and share (e.g. the other rows' sub-batch).
    memo: dict[str, Any] = field(default_factory=dict, compare=False)

    def computed_rows(self) -> list[int]:
        """Rows whose attention their scheme computes (the others go to vLLM's kernel)."""
        return [r for r, s in enumerate(self.schemes) if s is not None and s.computes_attention]


_current: StepPlan | None = None


def publish(plan: StepPlan | None) -> None:
    global _current
    _current = plan


def current() -> StepPlan | None:
    return _current


def scheme_from_extra_args(extra_args: dict[str, Any] | None) -> AttentionScheme | None:
    spec = (extra_args or {}).get(ATTENTION_EXTRA_KEY)
    return None if spec is None else scheme_from_spec(spec)
