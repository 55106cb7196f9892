"""Recall vs throughput scatter, one panel per workload, from bench/run.py results.

python bench/run.py --plot out.png                # during a run
python bench/plot.py results.json out.png         # from a run's --json
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MARKERS = "o^sDv<>pP*hX8d"


def _style(methods: list[str]) -> dict[str, tuple[str, Any]]:
    """A marker and colour per method, the same in every panel."""
    colours = plt.get_cmap("tab10").colors + plt.get_cmap("tab20").colors[1::2]
    return {
        m: (MARKERS[i % len(MARKERS)], colours[i % len(colours)]) for i, m in enumerate(methods)
    }


def plot_results(results: list[dict[str, Any]], path: str) -> None:
    """results: Row.summary() dicts (workload, method, queries_per_s, mean_recall)."""
    workloads = list(dict.fromkeys(r["workload"] for r in results))
    methods = list(dict.fromkeys(r["method"] for r in results))
    style = _style(methods)
    cols = min(2, len(workloads))
    nrows = math.ceil(len(workloads) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6.5 * cols, 4.6 * nrows), squeeze=False)
    for ax, wl in zip(axes.flat, workloads):
        for r in (r for r in results if r["workload"] == wl):
            marker, colour = style[r["method"]]
            ax.scatter(
                r["queries_per_s"],
                r["mean_recall"],
                marker=marker,
                color=colour,
                s=70,
                edgecolors="black",
                linewidths=0.5,
                label=r["method"],
                zorder=3,
            )
        ax.set_xscale("log")
        ax.set_title(wl)
        ax.set_xlabel("queries/s (G*Q / step time, add included)")
        ax.set_ylabel("recall@k")
        low = min(r["mean_recall"] for r in results if r["workload"] == wl)
        ax.set_ylim(min(0.85, low - 0.02), 1.01)
        ax.grid(True, which="both", alpha=0.3, zorder=0)
    for ax in list(axes.flat)[len(workloads) :]:
        ax.set_visible(False)
    handles = [
        plt.Line2D(
            [], [], marker=m, color=c, linestyle="", markersize=8, markeredgecolor="black", label=n
        )
        for n, (m, c) in style.items()
    ]
    fig.tight_layout()
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        sys.exit("usage: python bench/plot.py RESULTS.json OUT.png")
    with open(argv[0]) as f:
        plot_results(json.load(f)["results"], argv[1])


if __name__ == "__main__":
    main(sys.argv[1:])
