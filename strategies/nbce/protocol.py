"""What NBCE's rows tell the engine: one typed tag per row, carried in `SamplingParams.extra_args`.

`NbceCombiner`, the `LockstepCombiner` an NBCE plan carries, writes a `RowTag` into each row's
`extra_args["nbce"]` as the service's lockstep runner (server/service/lockstep.py) submits the
rows; the engine's logits processor (processor.py) reads it back. The defaults of the combination
live here and nowhere else: the strategy's parameters, the processor and the reference use them.

    >>> tag = RowTag(job="j", group="j:0", row=1, rows=3, base=0, combination=Combination(beta=0.5), draw=Draw())
    >>> RowTag.from_extra_args(tag.to_extra_args()) == tag
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

from server.engines.base import LockstepRow, OutputConstraint, SamplingOptions

EXTRA_KEY = "nbce"
# A row that announces its request's output constraint before the group runs (NBCE's prefill rows),
# so that the engine core compiles it meanwhile.
GRAMMAR_AHEAD_KEY = "nbce_grammar"

Pooling = Literal["min_entropy", "max_prob", "mean"]
POOLINGS: tuple[str, ...] = get_args(Pooling)


@dataclass(frozen=True)
class Combination:
    """How one step's row distributions become one: the strategy's parameters.

    `beta`: weight of the unconditioned row; `pooling`: how the context rows are pooled; `eta`:
    stickiness bonus (nats) for the row pooled at the previous step; `top_p`: per-row nucleus
    truncation before pooling (None: the full vocabulary).
    """

    beta: float = 0.25
    pooling: Pooling = "min_entropy"
    eta: float = 0.0
    top_p: float | None = None


@dataclass(frozen=True)
class Draw:
    """How the token is drawn from the combined scores: the request's own sampling options."""

    greedy: bool = True
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    @classmethod
    def from_sampling(cls, sampling: SamplingOptions) -> Draw:
        return cls(
            greedy=sampling.greedy,
            temperature=float(sampling.temperature),
            top_k=sampling.top_k,
            top_p=None if sampling.top_p is None or sampling.top_p >= 1.0 else float(sampling.top_p),
            seed=sampling.seed,
        )


@dataclass(frozen=True)
class RowTag:
    """One row of an NBCE group as the engine sees it.

    `group` names one submission of the rows (`job`:attempt); `row` is the row's index (0: the
    unconditioned row) among `rows`; `base` is how many tokens were confirmed before this
    submission (they are appended to the prompt), so `base` + the row's output length is the
    absolute position of the token being chosen.
    """

    job: str
    group: str
    row: int
    rows: int
    base: int
    combination: Combination
    draw: Draw
    # What the combined output must match (structured output), and the tokens that end it.
    constraint: OutputConstraint | None = None
    stop_token_ids: tuple[int, ...] = ()

    def to_extra_args(self) -> dict[str, Any]:
        raw = asdict(self)
        raw["constraint"] = None if self.constraint is None else self.constraint.to_dict()
        return {EXTRA_KEY: raw}

    @classmethod
    def from_extra_args(cls, extra_args: Mapping[str, Any] | None) -> RowTag | None:
        """The tag in a request's extra_args; None for ordinary rows. ValueError if malformed."""
        raw = (extra_args or {}).get(EXTRA_KEY)
        if raw is None:
            return None
        try:
            tag = cls(
                job=str(raw["job"]),
                group=str(raw["group"]),
                row=int(raw["row"]),
                rows=int(raw["rows"]),
                base=int(raw["base"]),
                combination=Combination(**raw["combination"]),
                draw=Draw(**raw["draw"]),
                constraint=None if raw.get("constraint") is None else OutputConstraint.from_dict(raw["constraint"]),
                stop_token_ids=tuple(int(t) for t in raw.get("stop_token_ids", ())),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"extra_args.{EXTRA_KEY}: not an NBCE row tag ({exc})") from None
        if not 0 <= tag.row < tag.rows or tag.combination.pooling not in POOLINGS:
            raise ValueError(
                f"extra_args.{EXTRA_KEY}: row {tag.row} of {tag.rows}, pooling {tag.combination.pooling!r}"
            )
        return tag


def announce(constraint: OutputConstraint | None) -> dict[str, Any] | None:
    """The `extra_args` of a row that announces its request's constraint (GRAMMAR_AHEAD_KEY)."""
    return None if constraint is None else {GRAMMAR_AHEAD_KEY: constraint.to_dict()}


def announced(extra_args: Mapping[str, Any] | None) -> OutputConstraint | None:
    """The constraint a row announces, if any. ValueError if malformed."""
    raw = (extra_args or {}).get(GRAMMAR_AHEAD_KEY)
    return None if raw is None else OutputConstraint.from_dict(raw)


@dataclass(frozen=True)
class NbceCombiner:
    """The `LockstepCombiner` of an NBCE plan: its rows are [question alone, document rows...], each
    tagged for the engine's NBCE processor, which combines them."""

    combination: Combination
    name: str = "nbce"

    def row_args(self, row: LockstepRow, sampling: SamplingOptions) -> dict[str, Any]:
        # The row's place in its group (job, group, row, rows, base, stop_token_ids), as the runner gave it.
        place = asdict(row)
        return RowTag(
            **place, combination=self.combination, draw=Draw.from_sampling(sampling), constraint=sampling.constraint
        ).to_extra_args()

    def prefill_args(self, sampling: SamplingOptions) -> dict[str, Any] | None:
        # A constrained request's grammar is compiled in the engine core while its rows prefill.
        return announce(sampling.constraint)
