"""What `ropeserve eval` measures, as plain data: written to results.json, read by the plots, the
Markdown table and the policy writer."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Score:
    """One cell: `correct` of `trials` (RULER and the varied-text tasks: summed scores), mean seconds
    per request, or why not."""

    correct: float = 0.0
    trials: int = 0
    seconds: float = 0.0
    refused: str | None = None  # the server's 422 message: the strategy cannot serve this length
    strategy: dict[str, Any] = field(default_factory=dict)  # the spec actually sent
    # The `--seed`s whose cases were run (a cell measured again under another seed adds its trials).
    seeds: list[int] = field(default_factory=lambda: [0])
    # The varied-text tasks: one record per trial (its depth, distance, score, seconds, answer).
    records: list[dict[str, Any]] = field(default_factory=list)
    # Their reference: the same probes without the document (continuation), or the controls at the
    # same positions (distant_copy); None where the task has none.
    baseline: float | None = None
    # What the cell cost the server: wall and CPU seconds, prefix-cache tokens looked up and served.
    cost: dict[str, Any] = field(default_factory=dict)
    # The strategy the server reported (for `auto`: what it picked and why), and its dry run's.
    served: dict[str, Any] = field(default_factory=dict)
    # Each trial scores between 0 and 1 (continuation, distant_copy), not 0 or 1.
    continuous: bool = False

    @property
    def accuracy(self) -> float | None:
        return None if self.refused or not self.trials else self.correct / self.trials

    def describe(self) -> str:
        """'17/20', or for a continuous score its mean and trials: '0.43 of 20'.

        >>> Score(correct=17, trials=20).describe(), Score(correct=8.6, trials=20, continuous=True).describe()
        ('17/20', '0.43 of 20')
        """
        if self.continuous and self.trials:
            return f"{self.correct / self.trials:.2f} of {self.trials}"
        return f"{self.correct:g}/{self.trials}"

    def add_run(self, other: Score) -> None:
        """Another seed's run of this cell: trials add up, seconds are the mean over all trials."""
        total = self.trials + other.trials
        if total:
            self.seconds = (self.seconds * self.trials + other.seconds * other.trials) / total
        if self.baseline is not None and other.baseline is not None and total:
            self.baseline = (self.baseline * self.trials + other.baseline * other.trials) / total
        self.correct += other.correct
        self.trials = total
        self.seeds = sorted(set(self.seeds) | set(other.seeds))
        self.records += other.records
        for key, value in other.cost.items():
            if isinstance(value, (int, float)) and isinstance(self.cost.get(key), (int, float)):
                self.cost[key] = round(self.cost[key] + value, 2)


@dataclass
class Curve:
    """Perplexity by position: the mean negative log-likelihood of each `bucket`-token window."""

    bucket: int
    ppl: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    refused: str | None = None
    strategy: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalResults:
    model: str
    native_window: int
    strategies: list[str]  # labels, in the order asked for
    specs: list[dict[str, Any]]
    lengths: list[int]
    # task -> strategy label -> str(length) -> Score
    tasks: dict[str, dict[str, dict[str, Score]]] = field(default_factory=dict)
    # strategy label -> Curve
    perplexity: dict[str, Curve] = field(default_factory=dict)
    perplexity_text: str = ""

    def score(self, task: str, strategy: str, length: int) -> Score:
        return self.tasks.setdefault(task, {}).setdefault(strategy, {}).setdefault(str(length), Score())

    def has(self, task: str, strategy: str, length: int, seed: int = 0) -> bool:
        """Whether the cell was measured under `seed` (or refused) already."""
        cell = self.tasks.get(task, {}).get(strategy, {}).get(str(length))
        return cell is not None and (cell.refused is not None or (cell.trials > 0 and seed in cell.seeds))

    def record(self, task: str, strategy: str, length: int, score: Score) -> None:
        """A measured cell; where the cell holds another seed's run, the new trials join it."""
        cells = self.tasks.setdefault(task, {}).setdefault(strategy, {})
        cell = cells.get(str(length))
        if cell is not None and cell.trials > 0 and score.trials > 0 and not set(score.seeds) & set(cell.seeds):
            cell.add_run(score)
        else:
            cells[str(length)] = score

    def extended(self, labels: list[str], specs: list[dict[str, Any]], lengths: list[int]) -> EvalResults:
        """These results with the strategies and lengths of another run added (a resumed run)."""
        for name, spec in zip(labels, specs, strict=True):
            if name not in self.strategies:
                self.strategies.append(name)
                self.specs.append(spec)
        self.lengths = sorted(set(self.lengths) | set(lengths))
        return self

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> EvalResults:
        raw = json.loads(path.read_text())
        tasks = {
            task: {s: {n: Score(**v) for n, v in by_len.items()} for s, by_len in by_strategy.items()}
            for task, by_strategy in raw.pop("tasks").items()
        }
        curves = {s: Curve(**c) for s, c in raw.pop("perplexity").items()}
        return cls(**raw, tasks=tasks, perplexity=curves)
