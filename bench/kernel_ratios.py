"""Per-kernel speed ratios on M1 or M4, from one process: the README's per-kernel table.

    KNNMEM_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 OPENBLAS_CORETYPE=Haswell \\
        python bench/kernel_ratios.py --kernels avx2,avx_vnni,avx512_vnni_bf16
    python bench/kernel_ratios.py --workload M4 --kernels avx2,avx512_vnni_bf16 --steps 21

M1 (one memory of 65,536 rows, d = 128, Q = 512) or M4 (8 memories of 65,536 rows,
d = 128, one query each), k = 32, recall target 0.9, clustered unit keys as in
knnmem.bench, with float32, bfloat16 and int8 keys. Every step adds one segment of Q
rows and searches Q queries; the kernels and key dtypes take turns step by step, so a
slow spell of a shared machine hits all of them. With one knnmem thread the time is the
CPU time of the calling thread (other load on the machine counts less); with more, wall
time. Steps run back to back, as in a training or decoding loop (one untimed round
first; --settle adds idle time before each step: on the 2-vCPU VM of the README, 30 ms
of idle made the next few milliseconds of work up to 1.7x slower, which weighs most on
the shortest steps, those of the narrowest keys). The float32 rate is compared with
numpy's sgemm, measured the same way in the same process (OPENBLAS_CORETYPE=Haswell in
the command: the AVX2 kernel of OpenBLAS, the reference for the avx2 and avx_vnni
kernels). Kernels this CPU lacks are skipped.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np

import knnmem
from knnmem import _core
from knnmem.bench.workloads import ClusteredStream

CAPACITY, DIM, K, TARGET = 65536, 128, 32, 0.9
SHAPES = {"M1": ((1,), 512), "M4": ((8,), 1)}  # memory grid, queries per memory


def sgemm_gflops(clock, n: int = 2048, repeats: int = 5) -> float:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b
    best = math.inf
    for _ in range(repeats):
        t0 = clock()
        a @ b
        best = min(best, clock() - t0)
    return 2 * n**3 / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kernels", default=",".join(_core.supported_kernels()))
    ap.add_argument("--dtypes", default="float32,bfloat16,int8")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--workload", choices=sorted(SHAPES), default="M1")
    ap.add_argument("--settle", type=float, default=0.0, help="idle seconds before each step")
    args = ap.parse_args()
    kernels = [k for k in args.kernels.split(",") if k in _core.supported_kernels()]
    dtypes = args.dtypes.split(",")
    clock = time.thread_time if knnmem.get_num_threads() == 1 else time.perf_counter

    shape, queries_per_memory = SHAPES[args.workload]
    grid = int(np.prod(shape))
    stream = ClusteredStream(np.random.default_rng(0), grid, DIM)
    keys = stream.rows(CAPACITY).reshape(*shape, CAPACITY, DIM)
    segments = [
        stream.rows(queries_per_memory).reshape(*shape, queries_per_memory, DIM) for _ in range(3)
    ]
    queries = stream.queries(queries_per_memory).reshape(*shape, queries_per_memory, DIM)
    rates = [sgemm_gflops(clock)]
    memories = {}
    for dtype in dtypes:
        mem = knnmem.Memory(shape, CAPACITY, DIM, DIM, dtype=dtype)
        mem.add(keys, -keys)
        memories[dtype] = mem
    times: dict[tuple[str, str], list[float]] = {(k, d): [] for k in kernels for d in dtypes}
    time.sleep(0.5)  # numpy's BLAS threads stop spinning after the sgemm
    for step in range(-1, args.steps):  # step -1: the untimed round
        for (kernel, dtype), spent in times.items():
            _core.set_kernel(kernel)
            mem, seg = memories[dtype], segments[step % len(segments)]
            if args.settle > 0:
                time.sleep(args.settle)
            t0 = clock()
            mem.add(seg, -seg)
            mem.search(queries, k=K, recall_target=TARGET)
            if step >= 0:
                spent.append(clock() - t0)
    _core.set_kernel("")
    rates.append(sgemm_gflops(clock))
    sgemm = max(rates)
    flops = 2 * grid * queries_per_memory * CAPACITY * DIM
    what = "thread CPU time" if clock is time.thread_time else "wall time"
    print(f"{args.workload}, {what}, median of {args.steps} steps; numpy sgemm {sgemm:.1f} GFLOP/s")
    print(f"{'kernel':18s} {'dtype':9s} {'ms/step':>8s} {'vs sgemm':>9s} {'vs float32':>10s}")
    for (kernel, dtype), spent in times.items():
        ms = 1e3 * statistics.median(spent)
        f32 = times.get((kernel, "float32"))
        ratio = 1e3 * statistics.median(f32) / ms if f32 else math.nan
        limit = 100 * flops / (sgemm * 1e9) / (ms / 1e3)
        print(f"{kernel:18s} {dtype:9s} {ms:8.2f} {limit:8.1f}% {ratio:9.2f}x")


if __name__ == "__main__":
    main()
