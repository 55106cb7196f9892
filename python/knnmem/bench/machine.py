"""The machine: its fp32 and memory-bandwidth rates (the limits of the table), and what
it is (CPU, threads, kernel, BLAS) for the report."""

from __future__ import annotations

import math
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

import knnmem

from .workloads import Workload, cpu_count

if TYPE_CHECKING:
    from .harness import Row

OPENBLAS_OVERRIDES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")

# Sizes of the rate measurements: (sgemm n, MiB copied / read). --tiny uses the small
# ones (a smoke test; its limits mean nothing).
RATE_SIZES = (2048, 512)
TINY_RATE_SIZES = (256, 8)


@dataclass
class Rates:
    """Machine rates measured during the run; the limits use the best of each."""

    sgemm_gflops: list[float] = field(default_factory=list)
    copy_gbps: list[float] = field(default_factory=list)
    read_gbps: list[float] = field(default_factory=list)

    def measure(self, tiny: bool = False) -> None:
        n, mib = TINY_RATE_SIZES if tiny else RATE_SIZES
        self.sgemm_gflops.append(sgemm_gflops(n))
        self.copy_gbps.append(copy_gbps(mib))
        self.read_gbps.append(read_gbps(mib))

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


# -- what the machine is -----------------------------------------------------------------------


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
    """numpy's BLAS libraries, where threadpoolctl is installed (else empty)."""
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
