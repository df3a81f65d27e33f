"""The evaluation reports people look at: reports/eval/table.md and reports/eval/f1_vs_rc.png.

table.md has three parts:
1. the layout of R1-Searcher++ Table 1 (METHOD.md A.11): one row per evaluated method, per dataset
   F1 / LasJ / RC, then Avg F1 / Avg LasJ / Avg RC. Datasets are the evaluation sets in the order
   HotpotQA, 2Wiki, Bamboogle, MuSiQue when present (the paper's), others after them by name; the
   averages are plain means over the datasets the method has (the paper's Avg F1 is not one, see A.11);
   LasJ is "–" without a judge;
2. every metric per dataset and method, as mean [95% bootstrap interval] (`evaluation.markdown_table`);
3. the paired comparisons: per dataset, a - b per question with its interval; an interval that
   excludes 0 is marked *.

The plot has one point per (method, dataset): F1 against RC (retrievals per question), the 95%
intervals as error bars, one colour per method, one marker per dataset; the Table-1 averages are
the large outlined points.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from searchrl.evaluation import markdown_table

PAPER_ORDER = ("hotpotqa", "2wiki", "2wikimultihopqa", "bamboogle", "musique")


def main_datasets(metrics: dict[str, dict[str, dict]]) -> list[str]:
    """The evaluation datasets of a metrics dict: without the pooled 'all' and the closed-book
    memorization sets ('<name>_seen'), in the paper's order, then the rest by name."""
    names = [d for d in metrics if d != "all" and not d.endswith("_seen")]

    def rank(name: str) -> tuple[int, str]:
        low = name.lower()
        hit = next((i for i, p in enumerate(PAPER_ORDER) if low.startswith(p)), len(PAPER_ORDER))
        return hit, low

    return sorted(names, key=rank)


def table_methods(metrics: dict[str, dict[str, dict]], order: list[str] | None = None) -> list[str]:
    """Methods with rows on a main dataset, in `order` first (params evaluate.methods), then by name."""
    have = {m for d in main_datasets(metrics) for m in metrics[d]}
    first = [m for m in (order or []) if m in have]
    return first + sorted(have - set(first))


def _fmt(value: float | None, digits: int) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def table1(metrics: dict[str, dict[str, dict]], order: list[str] | None = None) -> str:
    """The R1-Searcher++ Table 1 layout (see the module docstring) as markdown."""
    datasets = main_datasets(metrics)
    cols = [f"{d} {c}" for d in datasets for c in ("F1", "LasJ", "RC")] + ["Avg F1", "Avg LasJ", "Avg RC"]
    lines = ["| Method | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for method in table_methods(metrics, order):
        cells: list[str] = []
        sums: dict[str, list[float]] = {"f1": [], "lasj": [], "retrievals": []}
        for d in datasets:
            m = metrics[d].get(method, {})
            for key, digits in (("f1", 1), ("lasj", 1), ("retrievals", 2)):
                cells.append(_fmt(m.get(key), digits))
                if key in m:
                    sums[key].append(m[key])
        for key, digits in (("f1", 1), ("lasj", 1), ("retrievals", 2)):
            vals = sums[key]
            cells.append(_fmt(sum(vals) / len(vals) if vals else None, digits))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(paired: dict[str, dict[str, dict]]) -> str:
    """Paired comparisons as markdown: one row per dataset and pair, `diff [lo, hi]` per metric."""
    keys = ("f1", "lasj", "cem", "em", "retrievals")
    present = [k for k in keys if any(k in e for pairs in paired.values() for e in pairs.values())]
    lines = ["| dataset | a - b | n | " + " | ".join(f"Δ {k}" for k in present) + " |",
             "|---|---|---:|" + "---:|" * len(present)]
    for dataset, pairs in paired.items():
        for name, e in pairs.items():
            cells = []
            for k in present:
                if k not in e:
                    cells.append("–")
                    continue
                digits = 2 if k == "retrievals" else 1
                text = f"{e[k]:+.{digits}f}"
                if f"{k}_lo" in e:
                    lo, hi = e[f"{k}_lo"], e[f"{k}_hi"]
                    text += f" [{lo:+.{digits}f}, {hi:+.{digits}f}]" + ("*" if lo > 0 or hi < 0 else "")
                cells.append(text)
            lines.append(f"| {dataset} | {name} | {e.get('n', 0)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report_markdown(metrics: dict[str, dict[str, dict]], paired: dict[str, dict[str, dict]],
                    order: list[str] | None = None, judge: dict | None = None) -> str:
    """The whole reports/eval/table.md."""
    parts = ["# Evaluation", "",
             "## Main table (R1-Searcher++ Table 1 layout: F1 and LasJ in %, RC = retrievals per question)", "",
             table1(metrics, order), ""]
    if judge:
        parts += [f"LasJ: judge `{judge.get('model')}` ({judge.get('backend')}, prompt {judge.get('prompt_version')}); "
                  f"{judge.get('unparseable', 0)} of {judge.get('judged', 0)} predictions got a reply neither True nor False "
                  "(counted as not True).", ""]
    parts += ["## All metrics (mean [95% bootstrap interval over questions])", "", markdown_table(metrics), ""]
    if any(paired.values()):
        parts += ["## Paired comparisons (per-question a - b, mean [95% bootstrap interval]; * = excludes 0)", "",
                  paired_table(paired), ""]
    return "\n".join(parts)


def plot_f1_vs_rc(metrics: dict[str, dict[str, dict]], out: str | os.PathLike,
                  order: list[str] | None = None) -> Path:
    """F1 against RC per method and dataset (see the module docstring); writes a PNG and returns its path.
    An empty metrics dict still writes a figure (the DVC plot output always exists)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = main_datasets(metrics)
    methods = table_methods(metrics, order)
    markers = "osD^vP*Xh<>"
    cmap = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    for i, method in enumerate(methods):
        color = cmap(i % cmap.N)
        xs, ys = [], []
        for j, d in enumerate(datasets):
            m = metrics[d].get(method)
            if not m or "f1" not in m or "retrievals" not in m:
                continue
            xerr = [[m["retrievals"] - m["retrievals_lo"]], [m["retrievals_hi"] - m["retrievals"]]] \
                if "retrievals_lo" in m else None
            yerr = [[m["f1"] - m["f1_lo"]], [m["f1_hi"] - m["f1"]]] if "f1_lo" in m else None
            ax.errorbar(m["retrievals"], m["f1"], xerr=xerr, yerr=yerr, fmt=markers[j % len(markers)], color=color,
                        alpha=0.55, ms=6, capsize=2, lw=0.8)
            xs.append(m["retrievals"])
            ys.append(m["f1"])
        if xs:
            ax.scatter([sum(xs) / len(xs)], [sum(ys) / len(ys)], s=140, facecolor=color, edgecolor="black",
                       zorder=3, label=method)
    for j, d in enumerate(datasets):  # marker legend for the datasets
        ax.plot([], [], markers[j % len(markers)], color="gray", label=d)
    ax.set_xlabel("RC: retrievals per question")
    ax.set_ylabel("F1 (%)")
    ax.set_title("F1 against retrieval count (large points: average over datasets)")
    ax.grid(alpha=0.3)
    if methods or datasets:
        ax.legend(fontsize=7, loc="best", ncol=2)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
