"""PNG plots and a Markdown summary of an EvalResults: a score heatmap (strategy x length) per
task, the varied-text tasks' score by distance, and perplexity-by-position curves."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from clients.eval.results import EvalResults, Score


def _k(n: int) -> str:
    return f"{n / 1000:g}k" if n % 1000 == 0 or n >= 10_000 else f"{n:,}"


@contextmanager
def _figure(path: Path, size: tuple[float, float]) -> Iterator[tuple[Any, Any]]:
    """A figure and its axes to draw on, laid out and written to `path` as PNG when the block ends.
    matplotlib is imported here, not at module level: only `ropeserve eval` draws."""
    import matplotlib

    # Agg: no display on a server or in CI.
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    try:
        yield fig, ax
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)


def _curves_legend(ax: Any, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)


def heatmap(results: EvalResults, task: str, path: Path) -> None:
    import numpy as np

    names, lengths = results.strategies, results.lengths
    grid = np.full((len(names), len(lengths)), np.nan)
    notes = [["" for _ in lengths] for _ in names]
    for i, name in enumerate(names):
        for j, length in enumerate(lengths):
            score = results.tasks.get(task, {}).get(name, {}).get(str(length))
            if score is None:
                continue
            if score.refused:
                notes[i][j] = "n/a"
            elif score.accuracy is not None:
                grid[i, j] = score.accuracy
                notes[i][j] = f"{score.describe()}\n{score.seconds:.0f} s"
    with _figure(path, (1.6 + 1.3 * len(lengths), 0.9 + 0.55 * len(names))) as (fig, ax):
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [_k(n) for n in lengths])
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel("prompt tokens")
        for i in range(len(names)):
            for j in range(len(lengths)):
                ax.text(j, i, notes[i][j], ha="center", va="center", fontsize=7)
        ax.set_title(f"{task}: mean score ({results.model})", fontsize=10)
        fig.colorbar(image, ax=ax, fraction=0.04)


def perplexity_curves(results: EvalResults, path: Path) -> None:
    with _figure(path, (7, 4)) as (_, ax):
        for name, curve in results.perplexity.items():
            if curve.refused or not curve.ppl:
                continue
            xs = [(i + 0.5) * curve.bucket for i in range(len(curve.ppl))]
            ax.plot(xs, curve.ppl, marker="o", markersize=3, label=name)
        ax.axvline(results.native_window, color="grey", linestyle="--", linewidth=1)
        ax.text(results.native_window, ax.get_ylim()[1], " native window", va="top", fontsize=8, color="grey")
        title = f"Perplexity by position: {results.perplexity_text} ({results.model})"
        _curves_legend(ax, "position in the text (tokens)", "perplexity of the window", title)


# Distance bins of the score-by-distance plot (tokens from the fact or passage to the document's end).
DISTANCE_EDGES = (0, 1000, 2000, 4000, 6000, 8000, 12000, 16000, 24000, 32000, 48000, 64000)


def by_distance(results: EvalResults, task: str, name: str) -> list[tuple[int, float, int]]:
    """(bin's upper edge, mean score, trials) of one strategy's trials of a task, all lengths pooled."""
    bins: dict[int, list[float]] = {}
    for score in results.tasks.get(task, {}).get(name, {}).values():
        for record in score.records:
            distance = record.get("distance")
            if distance is None:
                continue
            edge = next((e for e in DISTANCE_EDGES[1:] if distance <= e), DISTANCE_EDGES[-1])
            bins.setdefault(edge, []).append(float(record["score"]))
    return [(edge, sum(v) / len(v), len(v)) for edge, v in sorted(bins.items())]


def distance_curves(results: EvalResults, task: str, path: Path) -> None:
    with _figure(path, (7, 4)) as (_, ax):
        for name in results.strategies:
            points = by_distance(results, task, name)
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, label=name)
        baselines = [
            s.baseline
            for cells in results.tasks.get(task, {}).values()
            for s in cells.values()
            if s.baseline is not None
        ]
        if baselines:
            baseline = sum(baselines) / len(baselines)
            ax.axhline(baseline, color="grey", linestyle=":", linewidth=1)
            ax.text(ax.get_xlim()[0], baseline, " baseline", va="bottom", fontsize=8, color="grey")
        ax.axvline(results.native_window, color="grey", linestyle="--", linewidth=1)
        ax.set_ylim(0, 1)
        _curves_legend(
            ax,
            "distance from the fact or passage to the end of the document (tokens, upper edge of bin)",
            "mean score",
            f"{task}: score by distance, all lengths pooled ({results.model})",
        )


def _cell_text(score: Score) -> str:
    text = f"{score.describe()} ({score.seconds:.0f} s)"
    if score.baseline is not None:
        text += f"; base {score.baseline:.2f}"
    return text


def cost_table(results: EvalResults) -> list[str]:
    """Wall and CPU seconds of the server per strategy and length, all tasks of the cell summed,
    and the prefix-cache tokens a document's first probe found cached (0: the document was fresh)."""
    out = ["**cost** (all tasks of a cell summed: wall s / server CPU s; first probes' cached tokens)", ""]
    out.append("| strategy | " + " | ".join(_k(n) for n in results.lengths) + " |")
    out.append("|---|" + "---|" * len(results.lengths))
    for name in results.strategies:
        cells = []
        for length in results.lengths:
            wall = cpu = cached = 0.0
            seen = cpu_known = False
            for by_strategy in results.tasks.values():
                score = by_strategy.get(name, {}).get(str(length))
                if score is None or not score.cost:
                    continue
                seen = True
                wall += score.cost.get("wall_s") or 0.0
                if score.cost.get("cpu_s") is not None:
                    cpu_known = True
                    cpu += score.cost["cpu_s"]
                cached += sum((r.get("first_probe_cache") or {}).get("cache_hits", 0.0) for r in score.records)
            cpu_text = f"{cpu:.0f}" if cpu_known else "?"
            cells.append(f"{wall:.0f} / {cpu_text}; {cached:g}" if seen else "–")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return [*out, ""]


def markdown(results: EvalResults) -> str:
    out = [f"Model: {results.model}; native window {results.native_window:,} tokens.", ""]
    for task, by_strategy in results.tasks.items():
        out += [f"**{task}** (correct/trials or mean score of trials, seconds per request; base: baseline)", ""]
        out.append("| strategy | " + " | ".join(_k(n) for n in results.lengths) + " |")
        out.append("|---|" + "---|" * len(results.lengths))
        for name in results.strategies:
            cells = []
            for length in results.lengths:
                score = by_strategy.get(name, {}).get(str(length))
                if score is None:
                    cells.append("–")
                elif score.refused:
                    cells.append("n/a")
                else:
                    cells.append(_cell_text(score))
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("")
    if any(s.cost for cells in results.tasks.values() for by in cells.values() for s in by.values()):
        out += cost_table(results)
    if results.perplexity:
        out += [f"**perplexity by position** ({results.perplexity_text}; per window of tokens)", ""]
        buckets = max((len(c.ppl) for c in results.perplexity.values()), default=0)
        bucket = next(iter(results.perplexity.values())).bucket
        out.append("| strategy | " + " | ".join(f"{i * bucket:,}–{(i + 1) * bucket:,}" for i in range(buckets)) + " |")
        out.append("|---|" + "---|" * buckets)
        for name, curve in results.perplexity.items():
            if curve.refused:
                out.append(f"| {name} | " + " | ".join(["n/a"] * buckets) + " |")
                continue
            cells = [f"{p:.1f}" for p in curve.ppl] + ["–"] * (buckets - len(curve.ppl))
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def write_all(results: EvalResults, out: Path) -> list[Path]:
    written = []
    for task in results.tasks:
        path = out / f"{task}.png"
        heatmap(results, task, path)
        written.append(path)
        if any(s.records for cells in results.tasks[task].values() for s in cells.values()):
            path = out / f"{task}_by_distance.png"
            distance_curves(results, task, path)
            written.append(path)
    if results.perplexity:
        path = out / "perplexity.png"
        perplexity_curves(results, path)
        written.append(path)
    (out / "results.md").write_text(markdown(results))
    written.append(out / "results.md")
    return written
