"""Training-curve figure of one or several RL runs (reports/rl/<run>/curves.png, the README figure).

Input: {run name: rows of reports/rl/<run>/log.csv} (see searchrl.training.rl.LOG_COLUMNS; empty
cells are missing values). One panel per quantity, one line per run, a light raw line plus a
moving average so short noisy CPU runs stay readable; a dotted line where a run's next phase starts
(R1-Searcher stage 1 -> stage 2, whose rewards are on different scales).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

PANELS = (("reward", "training reward"), ("format_valid", "format-valid rate"),
          ("correct", "correct (CEM, <=10 words)"), ("retrievals", "retrievals per rollout"),
          ("internal_steps", "<internal> steps per rollout"), ("memorization_size", "memorization set size"))


def read_log(path: str | os.PathLike) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _segments(rows: list[dict], col: str) -> list[tuple[list[int], list[float]]]:
    """(steps, values) of `col` per phase (consecutive rows of one phase), missing values skipped."""
    out: list[tuple[list[int], list[float]]] = []
    phase = None
    for r in rows:
        if r.get("phase") != phase or not out:
            phase = r.get("phase")
            out.append(([], []))
        v = r.get(col, "")
        if v not in ("", None):
            out[-1][0].append(int(r["step"]))
            out[-1][1].append(float(v))
    return [seg for seg in out if seg[0]]


def _smooth(ys: list[float], k: int) -> list[float]:
    return [sum(ys[max(0, i - k + 1): i + 1]) / len(ys[max(0, i - k + 1): i + 1]) for i in range(len(ys))]


def plot_curves(runs: dict[str, list[dict]], out: str | os.PathLike, smooth: int = 5) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5), constrained_layout=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (col, title) in zip(axes.flat, PANELS, strict=True):
        for i, (name, rows) in enumerate(runs.items()):
            c = colors[i % len(colors)]
            for j, (xs, ys) in enumerate(_segments(rows, col)):  # phases are smoothed separately
                if j:
                    ax.axvline(xs[0] - 0.5, color=c, linestyle=":", linewidth=1)
                ax.plot(xs, ys, color=c, alpha=0.25, linewidth=1)
                ax.plot(xs, _smooth(ys, smooth), color=c, linewidth=2, label=name if j == 0 else None)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, -0.08), ncol=min(len(labels), 3),
                   fontsize=9, frameon=False)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out
