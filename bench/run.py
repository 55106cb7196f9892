"""Recall/latency benchmark of knnmem against numpy exact search (DESIGN.md, "Benchmark workloads").

Reproduce (numpy must run its current sgemm kernel, so drop the OpenBLAS overrides
for this command alone):

    pip install --no-build-isolation .
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/run.py            # M1,M2, 5 steps
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/run.py --quick    # 3 steps
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/run.py --workloads M3,M4

Data (seeded by --seed): per memory 256 unit Gaussian cluster centres; a row is its
centre plus noise (|noise| ~ 0.8), normalised; consecutive stream rows share a cluster
for runs of mean length 8; queries pick clusters independently. Values are -keys.

Per workload every method gets its own state, filled to capacity with the same
clustered stream (untimed). Then each step adds one segment of Q rows per memory
and searches Q queries, with the same segment and queries for every method; the
timed step is add + search, reported as the median over steps. Recall@k is measured
every step against float64 exact top-k over the live rows (knnmem.eval.exact_search),
and returned values are checked against the rows at the returned positions.

The compute limit is the time of 2*Q*n*d*G flops at the fp32 rate of a 2048^3 numpy
sgemm, best of measurements at the start and after each workload of the same run
(shared VMs change speed for seconds at a time); "% limit" = limit time / step time.
Timings on a noisy machine: compare ratios within one run, and check step_ms in --json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

import knnmem
from knnmem.eval import bins_for_recall, exact_search, expected_recall, recall

# -- workloads -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    name: str
    shape: tuple[int, ...]
    capacity: int
    dim: int
    queries: int
    k: int = 32

    @property
    def grid(self) -> int:
        return math.prod(self.shape)

    @property
    def step_flops(self) -> float:
        """Flops of scoring Q queries against every row of every memory."""
        return 2.0 * self.queries * self.capacity * self.dim * self.grid

    def describe(self) -> str:
        return (
            f"{self.name}: shape={self.shape} capacity={self.capacity} d={self.dim} "
            f"Q={self.queries} k={self.k}"
        )


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("M1", (1,), 65536, 128, 512),
        Workload("M2", (2, 8), 8192, 64, 512),
        Workload("M3", (1,), 1_048_576, 128, 64),
        Workload("M4", (8,), 65536, 128, 1),
    )
}

OPENBLAS_OVERRIDES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
FILL_CHUNK_FLOATS = 1 << 24  # rows per fill chunk: about 64 MiB of keys across the grid


# -- data ------------------------------------------------------------------------------------


def unit_rows(x: np.ndarray) -> np.ndarray:
    """x / |x| along the last axis, float32."""
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norm, 1e-12)).astype(np.float32, copy=False)


class ClusteredStream:
    """Unit rows near per-memory Gaussian cluster centres, all memories of a grid at once.

    A row is centre + N(0, noise^2 / d) noise, normalised. In stream order consecutive
    rows come from one cluster for runs of geometric length (mean `mean_run`), as text
    tokens would; queries pick a cluster independently per query.
    """

    def __init__(
        self,
        rng: np.random.Generator,
        grid: int,
        dim: int,
        clusters: int = 256,
        mean_run: float = 8.0,
        noise: float = 0.8,
    ) -> None:
        self.rng = rng
        self.clusters = clusters
        self.mean_run = mean_run
        self.sigma = noise / math.sqrt(dim)
        self.centres = unit_rows(rng.standard_normal((grid, clusters, dim), dtype=np.float32))
        self._pending = [np.empty(0, np.int64) for _ in range(grid)]

    def _stream_labels(self, g: int, n: int) -> np.ndarray:
        labels = self._pending[g]
        while labels.size < n:
            runs = self.rng.geometric(1.0 / self.mean_run, size=int(n / self.mean_run) + 1)
            ids = self.rng.integers(0, self.clusters, size=runs.size)
            labels = np.concatenate([labels, np.repeat(ids, runs)])
        self._pending[g] = labels[n:]
        return labels[:n]

    def _sample(self, labels: np.ndarray) -> np.ndarray:
        centres = np.take_along_axis(self.centres, labels[..., None], axis=1)
        noise = self.rng.standard_normal(centres.shape, dtype=np.float32)
        return unit_rows(centres + self.sigma * noise)

    def rows(self, n: int) -> np.ndarray:
        """The next n rows of every memory's stream: [G, n, d] float32."""
        labels = np.stack([self._stream_labels(g, n) for g in range(len(self._pending))])
        return self._sample(labels)

    def queries(self, n: int) -> np.ndarray:
        """n queries per memory: [G, n, d] float32."""
        labels = self.rng.integers(0, self.clusters, size=(len(self._pending), n))
        return self._sample(labels)


def values_of(keys: np.ndarray) -> np.ndarray:
    """Values stored with keys (distinct from the keys, so a key/value mix-up shows)."""
    return -keys


# -- ring of keys in numpy: reference for recall and the numpy-exact method -------------------


class Ring:
    """FIFO ring [G, capacity, dim]; stream position p lives in row p % capacity."""

    def __init__(self, grid: int, capacity: int, dim: int) -> None:
        self.data = np.zeros((grid, capacity, dim), np.float32)
        self.capacity = capacity
        self.written = 0

    def add(self, rows: np.ndarray) -> None:
        skip = max(0, rows.shape[1] - self.capacity)  # rows overwritten within this add
        self.written += skip
        rows = rows[:, skip:]
        n = rows.shape[1]
        slots = (self.written + np.arange(n)) % self.capacity
        self.data[:, slots] = rows
        self.written += n

    def positions(self, slots: np.ndarray) -> np.ndarray:
        """Stream position of the row held in each ring slot."""
        return self.written - self.capacity + (slots - self.written) % self.capacity

    def live(self) -> tuple[int, np.ndarray]:
        """(first live position, live rows in stream order [G, n_live, dim])."""
        start = max(0, self.written - self.capacity)
        return start, self.data[:, np.arange(start, self.written) % self.capacity]

    def exact_topk(self, queries: np.ndarray, k: int) -> np.ndarray:
        """Float64 exact top-k stream positions [G, Q, k] over the live rows."""
        start, rows = self.live()
        _, idx = exact_search(rows, queries, k)
        return np.where(idx >= 0, idx + start, -1)


# -- methods ---------------------------------------------------------------------------------


@dataclass
class Found:
    positions: np.ndarray  # [G, Q, k] int64 stream positions, -1 where none
    values: np.ndarray  # [G, Q, k, dv] float32


class Method(Protocol):
    name: str

    def add(self, keys: np.ndarray, values: np.ndarray) -> None: ...

    def search(self, queries: np.ndarray) -> Any: ...

    def found(self, raw: Any) -> Found: ...


class KnnmemMethod:
    """knnmem.Memory at one recall_target (1.0 = exact)."""

    def __init__(self, wl: Workload, recall_target: float) -> None:
        self.name = "knnmem exact" if recall_target >= 1.0 else f"knnmem r={recall_target:.2f}"
        self.recall_target = recall_target
        self.wl = wl
        self.mem = knnmem.Memory(wl.shape, wl.capacity, key_dim=wl.dim, value_dim=wl.dim)

    def _grid(self, x: np.ndarray) -> np.ndarray:
        return x.reshape(self.wl.shape + x.shape[1:])

    def add(self, keys: np.ndarray, values: np.ndarray) -> None:
        self.mem.add(self._grid(keys), self._grid(values))

    def search(self, queries: np.ndarray) -> knnmem.SearchResult:
        return self.mem.search(self._grid(queries), k=self.wl.k, recall_target=self.recall_target)

    def found(self, raw: knnmem.SearchResult) -> Found:
        g, dv = self.wl.grid, self.wl.dim
        return Found(
            raw.indices.reshape(g, -1, self.wl.k), raw.values.reshape(g, -1, self.wl.k, dv)
        )


class NumpyExact:
    """Keys/values rings in numpy; sgemm per memory + argpartition + sort of the k + gather.

    The score buffer is kept between searches and argpartition runs on blocks of rows
    so that its index arrays stay small: fresh multi-100 MB arrays every step cost
    page faults that made this baseline vary up to 2x from run to run.
    """

    name = "numpy exact"
    PARTITION_BLOCK = 1 << 19  # elements per argpartition call (4 MiB of int64 indices)

    def __init__(self, wl: Workload) -> None:
        self.k = wl.k
        self.keys = Ring(wl.grid, wl.capacity, wl.dim)
        self.values = Ring(wl.grid, wl.capacity, wl.dim)
        self._scores = np.empty((wl.grid, 0, wl.capacity), np.float32)

    def add(self, keys: np.ndarray, values: np.ndarray) -> None:
        self.keys.add(keys)
        self.values.add(values)

    def _score(self, queries: np.ndarray) -> np.ndarray:
        """[G, Q, n] scores of every ring row (the benchmark searches full memories only)."""
        if self._scores.shape[1] != queries.shape[1]:
            self._scores = np.empty(queries.shape[:2] + (self.keys.capacity,), np.float32)
        for g in range(queries.shape[0]):
            np.matmul(queries[g], self.keys.data[g].T, out=self._scores[g])
        return self._scores

    def _top_slots(self, scores: np.ndarray) -> np.ndarray:
        """Ring slots of the k best scores of each row of [R, n], best first."""
        k, n = self.k, scores.shape[-1]
        part = np.empty((scores.shape[0], k), np.int64)
        block = max(1, self.PARTITION_BLOCK // n)
        for r in range(0, scores.shape[0], block):
            part[r : r + block] = np.argpartition(scores[r : r + block], n - k, axis=-1)[:, n - k :]
        top = np.take_along_axis(scores, part, axis=-1)
        return np.take_along_axis(part, np.argsort(-top, axis=-1), axis=-1)

    def search(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores = self._score(queries)
        grid, nq, n = scores.shape
        slots = self._top_slots(scores.reshape(grid * nq, n)).reshape(grid, nq, self.k)
        grid_index = np.arange(slots.shape[0])[:, None, None]
        return slots, self.values.data[grid_index, slots]

    def found(self, raw: tuple[np.ndarray, np.ndarray]) -> Found:
        slots, values = raw
        return Found(self.keys.positions(slots), values)


def make_methods(wl: Workload) -> list[Method]:
    return [
        KnnmemMethod(wl, 0.9),
        KnnmemMethod(wl, 0.95),
        KnnmemMethod(wl, 1.0),
        NumpyExact(wl),
    ]


def expected_recall_of(method: Method, wl: Workload) -> float | None:
    """Model recall of an approximate knnmem search on a full memory; None if exact."""
    if not isinstance(method, KnnmemMethod):
        return None
    bins = bins_for_recall(wl.k, method.recall_target)
    if bins == 0 or bins >= wl.capacity:
        return None
    return expected_recall(bins, wl.k)


# -- measurement -----------------------------------------------------------------------------


@dataclass
class Row:
    workload: str
    method: str
    step_ms: list[float] = field(default_factory=list)
    recalls: list[float] = field(default_factory=list)
    expected_recall: float | None = None
    limit_ms: float = 0.0
    numpy_ms: float = 0.0

    @property
    def ms(self) -> float:
        return statistics.median(self.step_ms)

    @property
    def recall(self) -> float:
        return statistics.fmean(self.recalls)

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(
            median_ms=self.ms,
            mean_recall=self.recall,
            speedup_vs_numpy=self.numpy_ms / self.ms,
            pct_of_limit=100.0 * self.limit_ms / self.ms,
        )
        return out


def check_values(found: Found, truth_ring: Ring, method: str) -> None:
    """Values returned must be those stored with the rows at the returned positions."""
    pos = found.positions
    ok = pos >= 0
    slots = np.where(ok, pos, 0) % truth_ring.capacity
    keys = truth_ring.data[np.arange(pos.shape[0])[:, None, None], slots]
    want = np.where(ok[..., None], values_of(keys), 0.0)
    got = np.where(ok[..., None], found.values, 0.0)
    if not np.array_equal(got, want):
        bad = int(np.any(got != want, axis=-1).sum())
        raise AssertionError(f"{method}: {bad} returned values differ from the stored rows")


def fill(methods: list[Method], truth: Ring, stream: ClusteredStream, wl: Workload) -> None:
    chunk = max(1, FILL_CHUNK_FLOATS // (wl.grid * wl.dim))
    for start in range(0, wl.capacity, chunk):
        keys = stream.rows(min(chunk, wl.capacity - start))
        values = values_of(keys)
        truth.add(keys)
        for m in methods:
            m.add(keys, values)


def timed_step(
    method: Method, keys: np.ndarray, values: np.ndarray, queries: np.ndarray
) -> tuple[float, Any]:
    """Seconds for one step (add the segment, search the queries) and the raw result."""
    t0 = time.perf_counter()
    method.add(keys, values)
    raw = method.search(queries)
    return time.perf_counter() - t0, raw


def run_workload(wl: Workload, steps: int, seed: int) -> list[Row]:
    stream = ClusteredStream(np.random.default_rng(seed), wl.grid, wl.dim)
    methods = make_methods(wl)
    truth = Ring(wl.grid, wl.capacity, wl.dim)
    fill(methods, truth, stream, wl)
    warm_queries = stream.queries(wl.queries)
    for m in methods:  # untimed: first-call allocations, thread pool start-up
        m.search(warm_queries)

    rows = [Row(wl.name, m.name, expected_recall=expected_recall_of(m, wl)) for m in methods]
    for step in range(steps):
        keys, queries = stream.rows(wl.queries), stream.queries(wl.queries)
        values = values_of(keys)
        truth.add(keys)
        true_topk = truth.exact_topk(queries, wl.k)
        shift = step % len(methods)  # rotate the order so machine noise spreads evenly
        pairs = list(zip(methods, rows))
        for m, row in pairs[shift:] + pairs[:shift]:
            seconds, raw = timed_step(m, keys, values, queries)
            found = m.found(raw)
            check_values(found, truth, m.name)
            row.step_ms.append(1e3 * seconds)
            row.recalls.append(recall(found.positions, true_topk))
    numpy_ms = next(r.ms for r in rows if r.method == NumpyExact.name)
    for row in rows:
        row.numpy_ms = numpy_ms
    return rows


def limit_ms(wl: Workload, gflops: float) -> float:
    """Time of one step's scoring flops at the given rate."""
    return 1e3 * wl.step_flops / (gflops * 1e9)


def sgemm_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Best fp32 rate of an n x n x n numpy matmul, in GFLOP/s."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b  # warm-up
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best / 1e9


# -- machine and report ----------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def blas_info() -> list[dict[str, Any]]:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    return [
        {key: info.get(key) for key in ("internal_api", "version", "num_threads", "architecture")}
        for info in threadpool_info()
        if info.get("user_api") == "blas"
    ]


def machine() -> dict[str, Any]:
    affinity = getattr(os, "sched_getaffinity", None)
    return {
        "cpu": cpu_model(),
        "nproc": len(affinity(0)) if affinity else os.cpu_count(),
        "knnmem_threads": knnmem.get_num_threads(),
        "numpy": np.__version__,
        "blas": blas_info(),
        "env": {k: os.environ[k] for k in OPENBLAS_OVERRIDES if k in os.environ},
    }


def print_machine(info: dict[str, Any]) -> None:
    print(f"cpu: {info['cpu']}   nproc: {info['nproc']}   knnmem threads: {info['knnmem_threads']}")
    blas = ", ".join(
        f"{b['internal_api']} {b['version']} ({b['architecture']}, {b['num_threads']} threads)"
        for b in info["blas"]
    )
    print(f"numpy {info['numpy']}" + (f"   BLAS: {blas}" if blas else ""))
    if info["env"]:
        print(f"warning: {info['env']} set; numpy sgemm may run an old kernel")
    print()


def print_sgemm(rates: list[float]) -> None:
    best, worst = max(rates), min(rates)
    print(
        f"numpy sgemm 2048^3 fp32: best {best:.1f} GFLOP/s (worst {worst:.1f}) over "
        f"{len(rates)} measurements across the run; the compute limit uses the best"
    )
    if worst < 0.8 * best:
        print("warning: machine throughput varied during the run; step times are noisy")


def format_table(rows: list[Row]) -> str:
    header = ("workload", "method", "ms/step", "recall@k", "expected", "vs numpy", "% limit")
    lines = [header]
    for r in rows:
        expected = "-" if r.expected_recall is None else f"{r.expected_recall:.4f}"
        lines.append(
            (
                r.workload,
                r.method,
                f"{r.ms:.2f}",
                f"{r.recall:.4f}",
                expected,
                f"{r.numpy_ms / r.ms:.2f}x",
                f"{100.0 * r.limit_ms / r.ms:.1f}%",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for n, line in enumerate(lines):
        cells = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))]
        out.append("  ".join(cells))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3 timed steps instead of 5")
    p.add_argument("--workloads", default="M1,M2", help=f"comma list of {','.join(WORKLOADS)}")
    p.add_argument("--steps", type=int, default=None, help="timed steps per workload")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="write the raw numbers here")
    args = p.parse_args(argv)
    names = [n.strip().upper() for n in args.workloads.split(",") if n.strip()]
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown or not names:
        p.error(f"--workloads: unknown {unknown}; choose from {','.join(WORKLOADS)}")
    args.workloads = names
    if args.steps is None:
        args.steps = 3 if args.quick else 5
    if args.steps < 1:
        p.error("--steps: expected >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t0 = time.perf_counter()
    info = machine()
    print_machine(info)
    rates = [sgemm_gflops()]  # re-measured after each workload: the limit is the best rate
    rows: list[Row] = []
    for name in args.workloads:
        wl = WORKLOADS[name]
        rows += run_workload(wl, args.steps, args.seed)
        rates.append(sgemm_gflops())
        print(f"done {wl.describe()}", flush=True)
    gflops = max(rates)
    for row in rows:
        row.limit_ms = limit_ms(WORKLOADS[row.workload], gflops)
    print()
    print_sgemm(rates)
    for name in args.workloads:
        print(f"compute limit {name}: {limit_ms(WORKLOADS[name], gflops):.3f} ms/step")
    print()
    print(format_table(rows))
    elapsed = time.perf_counter() - t0
    print(f"\n{args.steps} timed steps per method, median ms/step; recall mean over steps.")
    print(f"total run time {elapsed:.1f} s")

    if args.json:
        report = {
            "args": vars(args),
            "machine": info,
            "sgemm_gflops": gflops,
            "sgemm_gflops_measurements": rates,
            "workloads": {n: asdict(WORKLOADS[n]) for n in args.workloads},
            "results": [r.summary() for r in rows],
            "elapsed_s": elapsed,
        }
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
