"""Tables and plots from result records (methods × datasets × shots, mean ± std over seeds)."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def summarize(
    records: Iterable[dict[str, Any]],
) -> dict[tuple[str, str, Any], tuple[float, float, int]]:
    """{(method, dataset, shots): (mean accuracy, std over seeds, number of seeds)}."""
    groups: dict[tuple[str, str, Any], list[float]] = defaultdict(list)
    for r in records:
        if r.get("status", "ok") == "ok":
            groups[(r["method"], r["dataset"], r.get("shots"))].append(float(r["accuracy"]))
    return {
        k: (statistics.fmean(v), statistics.pstdev(v) if len(v) > 1 else 0.0, len(v))
        for k, v in groups.items()
    }


def markdown_table(records: Iterable[dict[str, Any]], with_std: bool = True) -> str:
    """Rows: methods; columns: dataset × shots, then the average; best per column in bold."""
    stats = summarize(records)
    methods = sorted({k[0] for k in stats})
    columns = sorted(
        {(k[1], k[2]) for k in stats}, key=lambda c: (c[0], c[1] if c[1] is not None else -1)
    )
    best = {
        c: max((stats[(m, *c)][0] for m in methods if (m, *c) in stats), default=None)
        for c in columns
    }
    header = ["method", *[f"{d} {s}-shot" if s is not None else d for d, s in columns], "average"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m in methods:
        cells, means = [], []
        for c in columns:
            if (m, *c) not in stats:
                cells.append("–")
                continue
            mean, std, n = stats[(m, *c)]
            means.append(mean)
            text = f"{mean:.1f}" + (f" ± {std:.1f}" if with_std and n > 1 else "")
            cells.append(
                f"**{text}**" if best[c] is not None and abs(mean - best[c]) < 1e-9 else text
            )
        average = f"{sum(means) / len(means):.1f}" if len(means) == len(columns) and means else "–"
        lines.append("| " + " | ".join([m, *cells, average]) + " |")
    return "\n".join(lines) + "\n"


def plot_accuracy_vs_shots(records: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """One panel per dataset plus an average panel: accuracy vs shots, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = summarize(records)
    datasets = sorted({k[1] for k in stats})
    methods = sorted({k[0] for k in stats})
    panels = [*datasets, "average"]
    cols = min(3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        for m in methods:
            if panel == "average":
                shots = sorted({k[2] for k in stats if k[0] == m and k[2] is not None})
                ys = []
                for s in shots:
                    vals = [stats[(m, d, s)][0] for d in datasets if (m, d, s) in stats]
                    ys.append(sum(vals) / len(vals) if len(vals) == len(datasets) else float("nan"))
            else:
                shots = sorted(
                    k[2] for k in stats if k[0] == m and k[1] == panel and k[2] is not None
                )
                ys = [stats[(m, panel, s)][0] for s in shots]
            if shots:
                ax.plot(shots, ys, marker="o", label=m)
        ax.set_title(panel)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("shots per class")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(5, len(labels)), fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
