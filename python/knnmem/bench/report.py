"""What a run prints (machine, rates, limits, the table) and writes (--json, --plot)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from typing import Any

import knnmem

from . import plot
from .harness import Results, Row, add_note
from .machine import RATE_SIZES, TINY_RATE_SIZES, Rates
from .workloads import Workload


def print_machine(info: dict[str, Any]) -> None:
    print(
        f"cpu: {info['cpu']}   nproc: {info['nproc']}   knnmem threads: "
        f"{info['knnmem_threads']}   kernel: {info['knnmem_kernel']}"
    )
    blas = ", ".join(
        f"{b['internal_api']} {b['version']} ({b['architecture']}, {b['num_threads']} threads)"
        for b in info["blas"]
    )
    print(f"numpy {info['numpy']}" + (f"   BLAS: {blas}" if blas else ""))
    if info["env"]:
        print(f"warning: {info['env']} set; numpy sgemm may run an old kernel")
    print()


def print_rates(rates: Rates, tiny: bool = False) -> None:
    n, mib = TINY_RATE_SIZES if tiny else RATE_SIZES
    for label, values, unit in (
        (f"numpy sgemm {n}^3 fp32", rates.sgemm_gflops, "GFLOP/s"),
        (f"numpy copy {mib} MiB (read+write)", rates.copy_gbps, "GB/s"),
        (f"numpy max {mib} MiB (read only, not in the limits)", rates.read_gbps, "GB/s"),
    ):
        print(
            f"{label}: best {max(values):.1f} {unit} (worst {min(values):.1f}) over "
            f"{len(values)} measurements; the limits use the best"
        )
    if min(rates.sgemm_gflops) < 0.8 * max(rates.sgemm_gflops):
        print("warning: machine throughput varied during the run; step times are noisy")


def print_recall_sample(rows: list[Row]) -> None:
    """Warns where recall@k rests on few queries (M4 has G*Q = 8 per step)."""
    for name in dict.fromkeys(r.workload for r in rows):
        row = next(r for r in rows if r.workload == name)
        n = row.queries_per_step * len(row.recalls)
        if n < 1000:
            print(f"{name}: recall@k from only {n} queries; raise --steps to tighten it")


def print_limits(rows: list[Row], rates: Rates) -> None:
    seen: set[str] = set()
    for r in rows:
        if r.workload in seen or r.key_bytes != 4.0:
            continue
        seen.add(r.workload)
        read = ""
        if r.limit_kind == "bandwidth" and rates.read_gbps:
            read_ms = r.bandwidth_limit_ms * max(rates.copy_gbps) / max(rates.read_gbps)
            read = f" (reading the keys at the read-only rate: {read_ms:.3f} ms/step)"
        print(
            f"limit {r.workload}: compute {r.compute_limit_ms:.3f} ms/step, memory bandwidth "
            f"{r.bandwidth_limit_ms:.3f} ms/step (f32 keys) -> {r.limit_kind}-bound{read}"
        )


def table(header: tuple[str, ...], lines: list[tuple[str, ...]], left: int = 2) -> str:
    """Columns padded to width; the first `left` columns and the last left-aligned."""
    everything = [header, *lines]
    widths = [max(len(line[i]) for line in everything) for i in range(len(header))]
    out = []
    for n, line in enumerate(everything):
        cells = [
            c.ljust(w) if i < left or i == len(header) - 1 else c.rjust(w)
            for i, (c, w) in enumerate(zip(line, widths))
        ]
        out.append("  ".join(cells).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


TABLE_HEADER = (
    "workload",
    "method",
    "ms/step",
    "recall@k",
    "expected",
    "vs numpy",
    "% limit",
    "note",
)


def format_table(rows: list[Row]) -> str:
    lines = []
    for r in rows:
        expected = "-" if r.expected_recall is None else f"{r.expected_recall:.4f}"
        kind = "bw" if r.limit_kind == "bandwidth" else "flops"
        lines.append(
            (
                r.workload,
                r.method,
                f"{r.ms:.2f}",
                f"{r.recall:.4f}",
                expected,
                f"{r.numpy_ms / r.ms:.2f}x",
                f"{100.0 * r.limit_ms / r.ms:.1f}% {kind}",
                r.full_note,
            )
        )
    return table(TABLE_HEADER, lines)


def format_scaling(rows: list[Row]) -> str:
    header = ("capacity", "method", "ms/step", "ms/M rows", "recall@k", "% limit")
    lines = []
    for r in rows:
        lines.append(
            (
                f"{r.capacity}",
                r.method,
                f"{r.ms:.2f}",
                f"{r.ms / (r.capacity / 1e6):.2f}",
                f"{r.recall:.4f}",
                f"{100.0 * r.limit_ms / r.ms:.1f}%",
            )
        )
    return table(header, lines)


def scaling_growth(rows: list[Row]) -> str:
    """Per method: growth of ms/step from the smallest to the largest capacity."""
    lines = []
    for method in dict.fromkeys(r.method for r in rows):
        mine = sorted((r for r in rows if r.method == method), key=lambda r: r.capacity)
        rows_x = mine[-1].capacity / mine[0].capacity
        growth = mine[-1].ms / mine[0].ms
        lines.append(f"{method}: ms/step x{growth:.1f} for x{rows_x:.0f} rows (linear: same)")
    return "\n".join(lines)


LEGEND = """
% limit: roofline time (the larger of the compute and key-bandwidth limits; flops or bw
says which) / step time. Key dtypes scale the bandwidth limit by their bytes; the compute
limit stays the fp32 sgemm rate, which bf16/int8 dot-product instructions can beat.
Indexes (built once on the full memory, build time not in ms/step) do not read every key:
theirs can exceed 100%."""

TINY_WARNING = (
    "--tiny: shrunk workloads and rate measurements (a smoke test); these numbers are not"
    " measurements"
)


def table_caption(rates: Rates) -> str:
    """The line above each table: the kernel that ran and the sgemm rate of "% limit"."""
    kernel = getattr(knnmem._core, "get_kernel", lambda: "?")()
    core = os.environ.get("OPENBLAS_CORETYPE")
    blas = f", OPENBLAS_CORETYPE={core}" if core else ""
    return (
        f"knnmem kernel {kernel}; % limit against numpy sgemm "
        f"{max(rates.sgemm_gflops):.1f} GFLOP/s{blas}"
    )


def print_report(res: Results, steps: int, tiny: bool = False) -> None:
    print()
    if tiny:
        print(TINY_WARNING)
    print_rates(res.rates, tiny)
    print_limits(res.rows + res.scaling, res.rates)
    print()
    if res.rows:
        print(table_caption(res.rates))
        print(format_table(res.rows))
        print(LEGEND)
        print_recall_sample(res.rows)
    if res.scaling:
        scaled = res.scaling[0]
        print(f"\nscaling (M3 shape, Q={scaled.queries_per_step}):")
        print(table_caption(res.rates))
        print(format_scaling(res.scaling))
        print(scaling_growth(res.scaling))
    print(f"\n{steps} timed steps per method, median ms/step; recall mean over steps.")


def write_json(
    path: str,
    args: dict[str, Any],
    info: dict[str, Any],
    res: Results,
    workloads: list[Workload],
) -> None:
    report = {
        "args": args,
        "machine": info,
        "sgemm_gflops": max(res.rates.sgemm_gflops),
        "copy_gbps": max(res.rates.copy_gbps),
        "read_gbps": max(res.rates.read_gbps),
        "rates": asdict(res.rates),
        "workloads": {wl.name: asdict(wl) for wl in workloads},
        "results": [r.summary() for r in res.rows],
        "scaling": [r.summary() for r in res.scaling],
        "notes": res.notes,
    }
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"results written to {path}")


def write_plot(path: str, rows: list[Row], notes: list[str]) -> None:
    """The recall vs queries/s scatter, or a note where matplotlib does not import."""
    why = plot.missing()
    if why is not None:
        add_note(notes, f"no plot: matplotlib does not import ({why}); pip install matplotlib")
        return
    plot.plot_results([r.summary() for r in rows], path)
    print(f"plot written to {path}")
