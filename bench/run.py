"""Recall/latency benchmark of knnmem and its peers on workloads M1-M4 (docs/design.md).

Reproduce (numpy must run its current sgemm kernel, so drop the OpenBLAS overrides
for this command alone; E = env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE):

    pip install .                                   # knnmem (as in README.md)
    pip install -c constraints.txt ".[bench]"       # peers, plots, progress bars (optional)
    E python bench/run.py --quick                   # M1,M2, 3 steps, fast peers (~1 min)
    E python bench/run.py                           # M1,M2, 5 steps
    E python bench/run.py --workloads M1,M2,M3,M4 --peers all --json out.json --plot out.png
    E python bench/run.py --scaling                 # M3's shape at 64K, 256K, 1M rows
    python -m pytest bench/test_micro.py --benchmark-only   # kernel micro-benchmarks

Methods. knnmem at recall targets 0.9, 0.95 and exact, and at 0.9 with each key dtype
of --dtypes this build accepts (bfloat16, float16, int8; a printed note for the
others). Peers (bench/peers.py), each skipped with a note when its library is
missing: --peers fast (default) = numpy exact, torch exact, jax approx_max_k;
--peers all adds faiss IndexFlatIP / IndexHNSWFlat / IndexIVFFlat, hnswlib (M=16,
32) and usearch, whose index builds take minutes on large memories. Peers without a
FIFO are built once on the filled memory (build time in the note and the JSON, not
in ms/step); per step they add the segment and drop the evicted rows by deletion or
an id filter, so every method answers over the same live rows. Their search
parameter is tuned to recall 0.9 on held-out queries. Indexes are per memory.

Data (seeded by --seed): per memory 256 unit Gaussian cluster centres; a row is its
centre plus noise (|noise| ~ 0.8), normalised; consecutive stream rows share a cluster
for runs of mean length 8; queries pick clusters independently. Values are -keys.

Per workload every method gets its own state, filled to capacity with the same
clustered stream (untimed). Then each step adds one segment of Q rows per memory
and searches Q queries, with the same segment and queries for every method; the
timed step is add + search, reported as the median over steps. Recall@k is measured
every step against float64 exact top-k over the live float32 rows
(knnmem.eval.exact_search), whatever the method stores, and returned values are
checked against the rows at the returned positions.

Limits (a roofline, both measured in the same run, best of measurements at the start
and after each workload, since shared VMs change speed for seconds at a time):
compute = 2*Q*n*d*G flops at the fp32 rate of a 2048^3 numpy sgemm; memory
bandwidth = the keys a brute-force step reads (G*n*d * bytes per key element) at the
rate of a 512 MiB numpy copy (read + write bytes). "% limit" = the larger of the two
limit times / step time; the table says which one binds (bandwidth for M4, Q=1;
compute for the others). The read-only rate of np.max over 512 MiB is printed beside
a bandwidth limit (a search only reads its keys), not used in "% limit".
Timings on a noisy machine: compare ratios within one run, and check step_ms in
--json. Each timed step starts SETTLE_S after the last one: the BLAS thread pools of
numpy, faiss and torch spin on their cores for up to ~0.1 s after a call returns
(OpenBLAS's thread timeout), and a step started inside that window ran ~40% slower
(knnmem M2 measured 59 -> 85 ms right after a numpy matmul).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

import knnmem
from knnmem.eval import bins_for_search, expected_recall, recall
from peers import (
    Found,
    Method,
    NumpyExact,
    Ring,
    Workload,
    cpu_count,
    missing_module,
    select_peers,
)

# -- workloads -------------------------------------------------------------------------------

WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("M1", (1,), 65536, 128, 512),
        Workload("M2", (2, 8), 8192, 64, 512),
        Workload("M3", (1,), 1_048_576, 128, 64),
        Workload("M4", (8,), 65536, 128, 1),
    )
}
SCALING_CAPACITIES = (65536, 262144, 1_048_576)
KEY_DTYPES = {"bfloat16": ("bf16", 2), "float16": ("f16", 2), "int8": ("i8", 1)}

OPENBLAS_OVERRIDES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
FILL_CHUNK_FLOATS = 1 << 24  # rows per fill chunk: about 64 MiB of keys across the grid
TUNE_QUERIES = 128  # held-out queries per memory for tuning index peers


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


# -- knnmem ----------------------------------------------------------------------------------


class KnnmemMethod(Method):
    """knnmem.Memory at one recall_target (1.0 = exact) and key dtype."""

    def __init__(self, wl: Workload, recall_target: float, dtype: str = "float32") -> None:
        super().__init__()
        self.recall_target = recall_target
        self.wl = wl
        self.mem = knnmem.Memory(wl.shape, wl.capacity, wl.dim, wl.dim, dtype=dtype)
        self.reuse_out = "out" in inspect.signature(self.mem.search).parameters
        self._out: knnmem.SearchResult | None = None
        short, self.key_bytes = KEY_DTYPES.get(dtype, ("", 4))
        target = "exact" if recall_target >= 1.0 else f"r={recall_target:.2f}"
        self.name = " ".join(filter(None, ("knnmem", short, target)))
        self.params = {"recall_target": recall_target, "dtype": dtype}
        bins = bins_for_search(wl.k, recall_target)
        if 0 < bins < wl.capacity:
            self.expected_recall = expected_recall(bins, wl.k)
            self.note = f"L={bins} strided bins"
        else:
            self.note = "exact top-k"
        if dtype != "float32" and self.expected_recall is not None:
            # The core widens the bins of rounded keys (Memory docstring); "expected" stays
            # the float32 model at this target, which their recall should reach.
            self.note = f"{dtype} keys; L={bins_for_search(wl.k, recall_target, dtype)} bins"

    def _grid(self, x: np.ndarray) -> np.ndarray:
        return x.reshape(self.wl.shape + x.shape[1:])

    def add(self, keys: np.ndarray, values: np.ndarray) -> None:
        self.mem.add(self._grid(keys), self._grid(values))

    def search(self, queries: np.ndarray) -> knnmem.SearchResult:
        """Reuses the previous result's arrays where Memory.search takes out= (the numpy
        baseline keeps its buffers too); the harness reads a result before the next."""
        q, kw = self._grid(queries), {"k": self.wl.k, "recall_target": self.recall_target}
        if self._out is not None and self._out.indices.shape[-2] == q.shape[-2]:
            return self.mem.search(q, out=self._out, **kw)
        res = self.mem.search(q, **kw)
        if self.reuse_out:
            self._out = res
        return res

    def found(self, raw: knnmem.SearchResult) -> Found:
        g, dv = self.wl.grid, self.wl.dim
        return Found(
            raw.indices.reshape(g, -1, self.wl.k), raw.values.reshape(g, -1, self.wl.k, dv)
        )


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


def add_note(notes: list[str], note: str) -> None:
    """Appends and prints a note once."""
    if note not in notes:
        notes.append(note)
        print(f"note: {note}", flush=True)


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


SETTLE_S = 0.2  # idle time before each timed step (module docstring)


def timed_step(
    method: Method, keys: np.ndarray, values: np.ndarray, queries: np.ndarray
) -> tuple[float, float, Any]:
    """Seconds to add the segment and to search the queries, and the raw result; the
    step starts once the other methods' spinning threads have gone to sleep."""
    time.sleep(SETTLE_S)
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
    wl: Workload, methods: list[Method], steps: int, seed: int, progress: Progress
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
            add_s, search_s, raw = timed_step(m, keys, values, queries)
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


# -- limits ----------------------------------------------------------------------------------


@dataclass
class Rates:
    """Machine rates measured during the run; the limits use the best of each."""

    sgemm_gflops: list[float] = field(default_factory=list)
    copy_gbps: list[float] = field(default_factory=list)
    read_gbps: list[float] = field(default_factory=list)

    def measure(self) -> None:
        self.sgemm_gflops.append(sgemm_gflops())
        self.copy_gbps.append(copy_gbps())
        self.read_gbps.append(read_gbps())

    def apply(self, row: Row, wl: Workload) -> None:
        row.compute_limit_ms = 1e3 * wl.step_flops / (max(self.sgemm_gflops) * 1e9)
        row.bandwidth_limit_ms = 1e3 * wl.key_bytes(row.key_bytes) / (max(self.copy_gbps) * 1e9)


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


def per_core(n: int) -> list[slice]:
    """[0, n) in one contiguous slice per core."""
    bounds = np.linspace(0, n, cpu_count() + 1).astype(np.int64)
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def best_seconds(whole: Any, parts: list[Any], run: Any, repeats: int) -> float:
    """Best time of run(*whole) on one thread and of run(*part) for every part at once,
    one part per core (numpy releases the GIL in both operations timed here)."""
    best = math.inf
    with ThreadPoolExecutor(len(parts)) as pool:
        for _ in range(repeats):
            t0 = time.perf_counter()
            run(*whole)
            best = min(best, time.perf_counter() - t0)
            t0 = time.perf_counter()
            list(pool.map(lambda p: run(*p), parts))
            best = min(best, time.perf_counter() - t0)
    return best


def copy_gbps(mib: int = 512, repeats: int = 4) -> float:
    """Best memory bandwidth of copying a float32 array of `mib` MiB with np.copyto, on
    one thread and split over all cores, counting the bytes read and written, in GB/s."""
    src = np.ones((mib << 20) // 4, np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # page faults out of the timing
    parts = [(dst[p], src[p]) for p in per_core(src.size)]
    return 2.0 * src.nbytes / best_seconds((dst, src), parts, np.copyto, repeats) / 1e9


def read_gbps(mib: int = 512, repeats: int = 4) -> float:
    """Best rate of reading a float32 array of `mib` MiB with np.max (a SIMD reduction
    that reads every byte once and writes nothing), as copy_gbps, in GB/s. A search
    of M4 only reads its keys: this is its ceiling on machines whose read rate is well
    under the read + write rate of a copy (reported beside the limit, not used in it)."""
    src = np.ones((mib << 20) // 4, np.float32)
    parts = [(src[p],) for p in per_core(src.size)]
    return src.nbytes / best_seconds((src,), parts, np.max, repeats) / 1e9


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
    return {
        "cpu": cpu_model(),
        "nproc": cpu_count(),
        "knnmem_threads": knnmem.get_num_threads(),
        "knnmem_kernel": getattr(knnmem._core, "get_kernel", lambda: "?")(),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "blas": blas_info(),
        "env": {k: os.environ[k] for k in OPENBLAS_OVERRIDES if k in os.environ},
    }


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


def print_rates(rates: Rates) -> None:
    for label, values, unit in (
        ("numpy sgemm 2048^3 fp32", rates.sgemm_gflops, "GFLOP/s"),
        ("numpy copy 512 MiB (read+write)", rates.copy_gbps, "GB/s"),
        ("numpy max 512 MiB (read only, not in the limits)", rates.read_gbps, "GB/s"),
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


def format_table(rows: list[Row]) -> str:
    header = (
        "workload",
        "method",
        "ms/step",
        "recall@k",
        "expected",
        "vs numpy",
        "% limit",
        "note",
    )
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
    return table(header, lines)


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


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
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
        "hnswlib32,usearch (numpy exact always runs: it is the baseline)",
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
    p.add_argument("--json", metavar="PATH", help="write the raw numbers here")
    p.add_argument("--plot", metavar="PATH", help="recall vs queries/s scatter per workload (PNG)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    workloads = args.workloads if args.workloads is not None else ("" if args.scaling else "M1,M2")
    names = [n.strip().upper() for n in workloads.split(",") if n.strip()]
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown or not (names or args.scaling):
        p.error(f"--workloads: unknown {unknown}; choose from {','.join(WORKLOADS)}")
    args.workloads = names
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if args.steps is None:
        args.steps = 3 if args.quick else 5
    if args.steps < 1:
        p.error("--steps: expected >= 1")
    try:
        select_peers(args.peers)
    except ValueError as e:
        p.error(f"--peers: {e}")
    return args


def scaling_workloads() -> list[Workload]:
    """M3's shape (one memory, d=128, Q=64) at each of SCALING_CAPACITIES."""
    m3 = WORKLOADS["M3"]
    return [Workload(f"M3@{c}", m3.shape, c, m3.dim, m3.queries, m3.k) for c in SCALING_CAPACITIES]


def run_scaling(args: argparse.Namespace, rates: Rates, progress: Progress) -> list[Row]:
    """knnmem r=0.9 and numpy exact on scaling_workloads()."""
    rows: list[Row] = []
    for wl in scaling_workloads():
        methods: list[Method] = [KnnmemMethod(wl, 0.9), NumpyExact(wl)]
        rows += run_workload(wl, methods, args.steps, args.seed, progress)
        del methods
        rates.measure()
        print(f"done scaling {wl.describe()}", flush=True)
    return rows


def write_plot(path: str, rows: list[Row], notes: list[str]) -> None:
    try:
        import plot
    except ImportError as e:
        add_note(notes, f"no plot: {e}")
        return
    plot.plot_results([r.summary() for r in rows], path)
    print(f"plot written to {path}")


@dataclass
class Results:
    rows: list[Row]
    scaling: list[Row]
    rates: Rates
    notes: list[str]


def measure_all(args: argparse.Namespace) -> Results:
    notes: list[str] = []
    progress = Progress(not args.no_progress, notes)
    rates = Rates()
    rates.measure()  # re-measured after each workload: the limits use the best rates
    rows: list[Row] = []
    for name in args.workloads:
        wl = WORKLOADS[name]
        methods = knnmem_methods(wl, args.dtypes, notes) + peer_methods(wl, args.peers, notes)
        rows += run_workload(wl, methods, args.steps, args.seed, progress)
        del methods  # free the memories before the next workload
        rates.measure()
        print(f"done {wl.describe()}", flush=True)
    scaling = run_scaling(args, rates, progress) if args.scaling else []
    known = {**WORKLOADS, **{wl.name: wl for wl in scaling_workloads()}}
    for row in rows + scaling:
        rates.apply(row, known[row.workload])
    return Results(rows, scaling, rates, notes)


LEGEND = """
% limit: roofline time (the larger of the compute and key-bandwidth limits; flops or bw
says which) / step time. Key dtypes scale the bandwidth limit by their bytes; the compute
limit stays the fp32 sgemm rate, which bf16/int8 dot-product instructions can beat.
Indexes (built once on the full memory, build time not in ms/step) do not read every key:
theirs can exceed 100%."""


def print_report(res: Results, steps: int) -> None:
    print()
    print_rates(res.rates)
    print_limits(res.rows + res.scaling, res.rates)
    print()
    if res.rows:
        print(format_table(res.rows))
        print(LEGEND)
        print_recall_sample(res.rows)
    if res.scaling:
        print("\nscaling (M3 shape, Q=64):")
        print(format_scaling(res.scaling))
        print(scaling_growth(res.scaling))
    print(f"\n{steps} timed steps per method, median ms/step; recall mean over steps.")


def write_json(path: str, args: argparse.Namespace, info: dict[str, Any], res: Results) -> None:
    report = {
        "args": vars(args),
        "machine": info,
        "sgemm_gflops": max(res.rates.sgemm_gflops),
        "copy_gbps": max(res.rates.copy_gbps),
        "read_gbps": max(res.rates.read_gbps),
        "rates": asdict(res.rates),
        "workloads": {n: asdict(WORKLOADS[n]) for n in args.workloads},
        "results": [r.summary() for r in res.rows],
        "scaling": [r.summary() for r in res.scaling],
        "notes": res.notes,
    }
    with open(path, "w") as f:
        json.dump(report, f, indent=2)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t0 = time.perf_counter()
    info = machine()
    print_machine(info)
    res = measure_all(args)
    print_report(res, args.steps)
    info["elapsed_s"] = time.perf_counter() - t0
    print(f"total run time {info['elapsed_s']:.1f} s")
    if args.plot and res.rows:
        write_plot(args.plot, res.rows, res.notes)
    if args.json:
        write_json(args.json, args, info, res)


if __name__ == "__main__":
    main()
