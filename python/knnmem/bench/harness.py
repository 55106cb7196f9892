"""Runs the methods on a workload: fill, build and tune (untimed), then timed steps of add +
search, with recall@k against exact top-k and the returned values checked every step."""

from __future__ import annotations

import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from knnmem.eval import recall

from .machine import Rates
from .methods import Found, KnnmemMethod, Method
from .peers import NumpyExact, missing_module, select_peers
from .workloads import ClusteredStream, Ring, Workload, scaling_workloads, values_of

FILL_CHUNK_FLOATS = 1 << 24  # rows per fill chunk: about 64 MiB of keys across the grid
TUNE_QUERIES = 128  # held-out queries per memory for tuning index peers
SETTLE_S = 0.2  # idle time before each timed step (the package docstring says why)


def add_note(notes: list[str], note: str) -> None:
    """Appends and prints a note once."""
    if note not in notes:
        notes.append(note)
        print(f"note: {note}", flush=True)


# -- methods ---------------------------------------------------------------------------------


def knnmem_methods(wl: Workload, dtypes: list[str], notes: list[str]) -> list[Method]:
    """knnmem at 0.9, 0.95, exact (float32 keys), and at 0.9 per supported key dtype."""
    methods: list[Method] = [KnnmemMethod(wl, t) for t in (0.9, 0.95, 1.0)]
    for dtype in dtypes:
        try:
            methods.append(KnnmemMethod(wl, 0.9, dtype))
        except ValueError as e:
            add_note(notes, f"knnmem dtype={dtype}: not supported by this build ({e})")
    return methods


def peer_methods(wl: Workload, peer_spec: str, notes: list[str]) -> list[Method]:
    methods: list[Method] = []
    for peer in select_peers(peer_spec):
        why = missing_module(peer)
        if why is None:
            methods.append(peer.make(wl))
        else:
            add_note(notes, f"skipped peer {peer.key}: {peer.module} does not import ({why})")
    return methods


# -- progress bars ---------------------------------------------------------------------------


class NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


class Progress:
    """tqdm bars on stderr when enabled, on a terminal, and tqdm is installed."""

    def __init__(self, enabled: bool, notes: list[str]) -> None:
        self.tqdm: Any = None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.tqdm = tqdm
            except ImportError:
                add_note(notes, "no progress bars: tqdm is not installed")

    def bar(self, total: int, desc: str, unit: str = "it") -> Any:
        if self.tqdm is None:
            return NoBar()
        return self.tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)


# -- measurement -----------------------------------------------------------------------------


@dataclass
class Row:
    workload: str
    method: str
    note: str = ""
    step_ms: list[float] = field(default_factory=list)
    add_ms: list[float] = field(default_factory=list)
    search_ms: list[float] = field(default_factory=list)
    recalls: list[float] = field(default_factory=list)
    expected_recall: float | None = None
    build_s: float | None = None
    params: dict[str, Any] = field(default_factory=dict)
    key_bytes: float = 4.0
    capacity: int = 0
    queries_per_step: int = 0
    numpy_ms: float = math.nan
    compute_limit_ms: float = math.nan
    bandwidth_limit_ms: float = math.nan

    @property
    def ms(self) -> float:
        return statistics.median(self.step_ms)

    @property
    def recall(self) -> float:
        return statistics.fmean(self.recalls)

    @property
    def limit_ms(self) -> float:
        return max(self.compute_limit_ms, self.bandwidth_limit_ms)

    @property
    def limit_kind(self) -> str:
        return "bandwidth" if self.bandwidth_limit_ms > self.compute_limit_ms else "compute"

    @property
    def full_note(self) -> str:
        if self.build_s is None:
            return self.note
        return f"{self.note}; built in {self.build_s:.1f} s"

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(
            median_ms=self.ms,
            mean_recall=self.recall,
            queries_per_s=1e3 * self.queries_per_step / self.ms,
            speedup_vs_numpy=self.numpy_ms / self.ms,
            limit_ms=self.limit_ms,
            limit_kind=self.limit_kind,
            pct_of_limit=100.0 * self.limit_ms / self.ms,
        )
        return out


def check_values(found: Found, truth: Ring, method: str) -> None:
    """Values returned must be those stored with the rows at the returned positions."""
    ok = found.positions >= 0
    want = values_of(truth.gather(found.positions))
    got = np.where(ok[..., None], found.values, 0.0)
    if not np.array_equal(got, want):
        bad = int(np.any(got != want, axis=-1).sum())
        raise AssertionError(f"{method}: {bad} returned values differ from the stored rows")


def fill(
    methods: list[Method], truth: Ring, stream: ClusteredStream, wl: Workload, progress: Progress
) -> None:
    chunk = max(1, FILL_CHUNK_FLOATS // (wl.grid * wl.dim))
    bar = progress.bar(wl.capacity, f"{wl.name} fill", unit="row")
    for start in range(0, wl.capacity, chunk):
        keys = stream.rows(min(chunk, wl.capacity - start))
        values = values_of(keys)
        truth.add(keys)
        for m in methods:
            m.fill(keys, values)
        bar.update(keys.shape[1])
    bar.close()


def build_and_tune(
    methods: list[Method], truth: Ring, stream: ClusteredStream, wl: Workload, progress: Progress
) -> None:
    """Builds every method (untimed in steps), tunes the tunable ones on held-out queries."""
    bar = progress.bar(len(methods), f"{wl.name} build+tune", unit="method")
    tune_queries = stream.queries(TUNE_QUERIES)
    tune_truth: np.ndarray | None = None
    for m in methods:
        m.build()
        if m.tunable:
            if tune_truth is None:
                tune_truth = truth.exact_topk(tune_queries, wl.k)
            m.tune(tune_queries, tune_truth)
        bar.update()
    bar.close()


def timed_step(
    method: Method, keys: np.ndarray, values: np.ndarray, queries: np.ndarray, settle_s: float
) -> tuple[float, float, Any]:
    """Seconds to add the segment and to search the queries, and the raw result; the
    step starts once the other methods' spinning threads have gone to sleep."""
    time.sleep(settle_s)
    t0 = time.perf_counter()
    method.add(keys, values)
    t1 = time.perf_counter()
    raw = method.search(queries)
    return t1 - t0, time.perf_counter() - t1, raw


def row_of(wl: Workload, m: Method) -> Row:
    return Row(
        wl.name,
        m.name,
        note=m.note,
        expected_recall=m.expected_recall,
        build_s=m.build_s,
        params=dict(m.params),
        key_bytes=m.key_bytes,
        capacity=wl.capacity,
        queries_per_step=wl.grid * wl.queries,
    )


def run_workload(
    wl: Workload,
    methods: list[Method],
    steps: int,
    seed: int,
    progress: Progress,
    settle_s: float = SETTLE_S,
) -> list[Row]:
    stream = ClusteredStream(np.random.default_rng(seed), wl.grid, wl.dim)
    truth = Ring(wl.grid, wl.capacity, wl.dim)
    fill(methods, truth, stream, wl, progress)
    build_and_tune(methods, truth, stream, wl, progress)
    warm_queries = stream.queries(wl.queries)
    for m in methods:  # untimed: first-call allocations, thread pool start-up, jit
        m.search(warm_queries)

    rows = [row_of(wl, m) for m in methods]
    bar = progress.bar(steps * len(methods), f"{wl.name} steps", unit="search")
    for step in range(steps):
        keys, queries = stream.rows(wl.queries), stream.queries(wl.queries)
        values = values_of(keys)
        truth.add(keys)
        true_topk = truth.exact_topk(queries, wl.k)
        shift = step % len(methods)  # rotate the order so machine noise spreads evenly
        pairs = list(zip(methods, rows))
        for m, row in pairs[shift:] + pairs[:shift]:
            add_s, search_s, raw = timed_step(m, keys, values, queries, settle_s)
            found = m.found(raw)
            check_values(found, truth, m.name)
            row.add_ms.append(1e3 * add_s)
            row.search_ms.append(1e3 * search_s)
            row.step_ms.append(1e3 * (add_s + search_s))
            row.recalls.append(recall(found.positions, true_topk))
            bar.update()
    bar.close()
    numpy_ms = next((r.ms for r in rows if r.method == NumpyExact.name), math.nan)
    for row in rows:
        row.numpy_ms = numpy_ms
    return rows


# -- a whole run -----------------------------------------------------------------------------


@dataclass
class Results:
    rows: list[Row]
    scaling: list[Row]
    rates: Rates
    notes: list[str]


def run_scaling(
    steps: int, seed: int, tiny: bool, rates: Rates, progress: Progress, settle_s: float
) -> list[Row]:
    """knnmem r=0.9 and numpy exact on scaling_workloads()."""
    rows: list[Row] = []
    for wl in scaling_workloads(tiny):
        methods: list[Method] = [KnnmemMethod(wl, 0.9), NumpyExact(wl)]
        rows += run_workload(wl, methods, steps, seed, progress, settle_s)
        del methods
        rates.measure(tiny)
        print(f"done scaling {wl.describe()}", flush=True)
    return rows


def measure_all(
    workloads: list[Workload],
    peers: str,
    dtypes: list[str],
    steps: int,
    seed: int,
    scaling: bool = False,
    tiny: bool = False,
    progress: bool = True,
) -> Results:
    """Every workload with knnmem and the peers, then the scaling run if asked; the rows
    carry the limits of the best rates measured along the way."""
    notes: list[str] = []
    bars = Progress(progress, notes)
    settle_s = 0.0 if tiny else SETTLE_S
    rates = Rates()
    rates.measure(tiny)  # re-measured after each workload: the limits use the best rates
    rows: list[Row] = []
    for wl in workloads:
        methods = knnmem_methods(wl, dtypes, notes) + peer_methods(wl, peers, notes)
        rows += run_workload(wl, methods, steps, seed, bars, settle_s)
        del methods  # free the memories before the next workload
        rates.measure(tiny)
        print(f"done {wl.describe()}", flush=True)
    scaled = run_scaling(steps, seed, tiny, rates, bars, settle_s) if scaling else []
    known = {wl.name: wl for wl in [*workloads, *scaling_workloads(tiny)]}
    for row in rows + scaled:
        rates.apply(row, known[row.workload])
    return Results(rows, scaled, rates, notes)
