"""A PNG comparing evaluation targets: one panel per task/metric, one bar per target, stderr as error bars."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_results(results: list[dict[str, Any]], path: Path) -> Path | None:
    """Write the comparison plot; None (and no file) when matplotlib is not installed or nothing to plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    keys = list(dict.fromkeys((r["task"], r["metric"]) for r in results))
    targets = list(dict.fromkeys(r["target"] for r in results))
    if not keys:
        return None
    by = {(r["task"], r["metric"], r["target"]): r for r in results}
    cols = min(3, len(keys))
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    colors = plt.get_cmap("tab10").colors
    for ax, (task, metric) in zip(axes.flat, keys, strict=False):
        rs = [by.get((task, metric, t)) for t in targets]
        values = [r["value"] if r else 0.0 for r in rs]
        errs = [(r.get("stderr") or 0.0) if r else 0.0 for r in rs]
        bars = ax.bar(targets, values, yerr=errs, capsize=3, color=[colors[i % 10] for i in range(len(targets))])
        for bar, r in zip(bars, rs, strict=True):
            if r:
                ax.annotate(
                    f"{r['value']:.3g}",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                )
        better = "higher" if next((r for r in rs if r), {}).get("higher_is_better", True) else "lower"
        ax.set_title(f"{task}\n{metric} ({better} is better)", fontsize=9)
        ax.tick_params(axis="x", labelsize=8, rotation=20)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
