"""python -m knnmem.bench: the command line of the benchmark (the package docstring is its
--help)."""

from __future__ import annotations

import argparse
import os
import time

import knnmem.bench

from .harness import measure_all
from .machine import machine
from .methods import KEY_DTYPES
from .peers import select_peers
from .report import print_machine, print_report, write_json, write_plot
from .workloads import SCALING_CAPACITIES, WORKLOADS, workloads

PROG = "python -m knnmem.bench"


def parse_args(argv: list[str] | None = None, prog: str = PROG) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=prog,
        description=knnmem.bench.__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="3 timed steps instead of 5")
    p.add_argument(
        "--workloads",
        default=None,
        help=f"comma list of {','.join(WORKLOADS)} (default M1,M2; none with --scaling)",
    )
    p.add_argument(
        "--peers",
        default="fast",
        help="fast (default): numpy, torch, jax; all: also faiss (IndexFlatIP, IndexHNSWFlat,\n"
        "IndexIVFFlat), hnswlib (M=16, 32), usearch (slow to build on large memories);\n"
        "or a comma list of: numpy,torch,jax,faiss-flat,faiss-hnsw,faiss-ivf,hnswlib16,\n"
        "hnswlib32,usearch (numpy exact always runs: it is the baseline). A peer whose\n"
        "library does not import is skipped with a note.",
    )
    p.add_argument(
        "--dtypes",
        default=",".join(KEY_DTYPES),
        help="knnmem key dtypes to add at r=0.9 where the build supports them ('' = none)",
    )
    p.add_argument(
        "--scaling",
        action="store_true",
        help=f"M3's shape (Q=64) at capacities {SCALING_CAPACITIES}: knnmem r=0.9, numpy exact",
    )
    p.add_argument("--steps", type=int, default=None, help="timed steps per workload")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--json", metavar="PATH", help="write the raw numbers here (default: not written)"
    )
    p.add_argument(
        "--plot",
        metavar="PATH",
        help="recall vs queries/s scatter per workload, PNG (default: not drawn; needs\n"
        "matplotlib, else a note and no plot)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--tiny",
        action="store_true",
        help="smoke test: every workload shrunk (same names and grids, ~1-8K rows, d=32,\n"
        "Q<=32), small rate measurements, no pause between steps, 2 steps unless --steps;\n"
        "runs in seconds; its numbers are not measurements",
    )
    args = p.parse_args(argv)
    workloads = args.workloads if args.workloads is not None else ("" if args.scaling else "M1,M2")
    names = [n.strip().upper() for n in workloads.split(",") if n.strip()]
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown or not (names or args.scaling):
        p.error(f"--workloads: unknown {unknown}; choose from {','.join(WORKLOADS)}")
    args.workloads = names
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if args.steps is None:
        args.steps = 2 if args.tiny else 3 if args.quick else 5
    if args.steps < 1:
        p.error("--steps: expected >= 1")
    try:
        select_peers(args.peers)
    except ValueError as e:
        p.error(f"--peers: {e}")
    for option in ("json", "plot"):  # fail now, not after a long run
        path = getattr(args, option)
        if path is not None and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            p.error(f"--{option}: no directory {os.path.dirname(os.path.abspath(path))!r}")
    return args


def main(argv: list[str] | None = None, prog: str = PROG) -> None:
    args = parse_args(argv, prog)
    t0 = time.perf_counter()
    info = machine()
    print_machine(info)
    chosen = [workloads(args.tiny)[name] for name in args.workloads]
    res = measure_all(
        chosen,
        args.peers,
        args.dtypes,
        args.steps,
        args.seed,
        scaling=args.scaling,
        tiny=args.tiny,
        progress=not args.no_progress,
    )
    print_report(res, args.steps, args.tiny)
    info["elapsed_s"] = time.perf_counter() - t0
    print(f"total run time {info['elapsed_s']:.1f} s")
    if args.plot and res.rows:
        write_plot(args.plot, res.rows, res.notes)
    if args.json:
        write_json(args.json, vars(args), info, res, chosen)


if __name__ == "__main__":
    main()
