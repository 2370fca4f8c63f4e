"""PNG plots and a Markdown summary of an EvalResults: an accuracy heatmap (strategy x length)
per task, and perplexity-by-position curves."""

from __future__ import annotations

from pathlib import Path

from clients.eval.results import EvalResults


def _k(n: int) -> str:
    return f"{n / 1000:g}k" if n % 1000 == 0 or n >= 10_000 else f"{n:,}"


def heatmap(results: EvalResults, task: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
                notes[i][j] = f"{score.correct:g}/{score.trials}\n{score.seconds:.0f} s"
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(lengths), 0.9 + 0.55 * len(names)))
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [_k(n) for n in lengths])
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("prompt tokens")
    for i in range(len(names)):
        for j in range(len(lengths)):
            ax.text(j, i, notes[i][j], ha="center", va="center", fontsize=7)
    ax.set_title(f"{task}: accuracy ({results.model})", fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def perplexity_curves(results: EvalResults, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, curve in results.perplexity.items():
        if curve.refused or not curve.ppl:
            continue
        xs = [(i + 0.5) * curve.bucket for i in range(len(curve.ppl))]
        ax.plot(xs, curve.ppl, marker="o", markersize=3, label=name)
    ax.axvline(results.native_window, color="grey", linestyle="--", linewidth=1)
    ax.text(results.native_window, ax.get_ylim()[1], " native window", va="top", fontsize=8, color="grey")

    ax.set_xlabel("position in the text (tokens)")
    ax.set_ylabel("perplexity of the window")
    ax.set_title(f"Perplexity by position: {results.perplexity_text} ({results.model})", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(results: EvalResults) -> str:
    out = [f"Model: {results.model}; native window {results.native_window:,} tokens.", ""]
    for task, by_strategy in results.tasks.items():
        out += [f"**{task}** (correct/trials, seconds per request)", ""]
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
                    cells.append(f"{score.correct:g}/{score.trials} ({score.seconds:.0f} s)")
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("")
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
    if results.perplexity:
        path = out / "perplexity.png"
        perplexity_curves(results, path)
        written.append(path)
    (out / "results.md").write_text(markdown(results))
    written.append(out / "results.md")
    return written
