"""Recall vs throughput scatter, one panel per workload, from a benchmark run's results.

    python -m knnmem.bench --plot out.png                # during a run
    python -m knnmem.bench.plot results.json out.png     # from a run's --json

Needs matplotlib (pip install matplotlib); draws on a figure of its own (no pyplot, so
the backend of an interactive session is left alone).
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

MARKERS = "o^sDv<>pP*hX8d"


def missing() -> str | None:
    """None if matplotlib imports, else a one-line reason."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except Exception as e:  # ImportError, or a broken install failing at import
        return f"{type(e).__name__}: {e}".splitlines()[0]
    return None


def _style(methods: list[str]) -> dict[str, tuple[str, Any]]:
    """A marker and colour per method, the same in every panel."""
    import matplotlib

    colours = matplotlib.colormaps["tab10"].colors + matplotlib.colormaps["tab20"].colors[1::2]
    return {
        m: (MARKERS[i % len(MARKERS)], colours[i % len(colours)]) for i, m in enumerate(methods)
    }


def plot_results(results: list[dict[str, Any]], path: str) -> None:
    """results: Row.summary() dicts (workload, method, queries_per_s, mean_recall)."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    workloads = list(dict.fromkeys(r["workload"] for r in results))
    methods = list(dict.fromkeys(r["method"] for r in results))
    style = _style(methods)
    cols = min(2, len(workloads))
    nrows = math.ceil(len(workloads) / cols)
    fig = Figure(figsize=(6.5 * cols, 4.6 * nrows))
    axes = fig.subplots(nrows, cols, squeeze=False)
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
        Line2D(
            [], [], marker=m, color=c, linestyle="", markersize=8, markeredgecolor="black", label=n
        )
        for n, (m, c) in style.items()
    ]
    fig.tight_layout()
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] in ("-h", "--help"):
        sys.exit("usage: python -m knnmem.bench.plot RESULTS.json OUT.png")
    why = missing()
    if why is not None:
        sys.exit(f"no plot: matplotlib does not import ({why}); pip install matplotlib")
    with open(argv[0]) as f:
        plot_results(json.load(f)["results"], argv[1])
    print(f"plot written to {argv[1]}")


if __name__ == "__main__":
    main()
