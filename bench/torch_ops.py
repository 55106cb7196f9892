"""Benchmark of the PyTorch custom ops (issue 6 targets), measured side by side.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/torch_ops.py
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/torch_ops.py --reps 21 --json out.json

Target 1, workload M1 (shape (1,), capacity 65536, d=128, Q=512, k=32):
    torch.ops.knnmem.search (recall_target 0.9) vs torch matmul + topk (exact)
    on CPU tensors; goal >= 4x faster at recall >= 0.9. The op runs with each
    precision: float32 scoring, and bfloat16 / int8 scoring of the same float32
    rows (rounded per search, as a Memory of that dtype stores them).
Target 2, workload M2 (shape (2, 8), capacity 8192, d=64, Q=512, k=32):
    torch.ops.knnmem.search vs knnmem.ops.search on numpy arrays (the direct
    path, same kernels); goal: dispatch overhead <= 10%. Also the op inside a
    torch.compile(fullgraph=True) function (one graph, no breaks).

Data: per memory 256 unit-norm cluster centres; each row is a centre plus noise
(|noise| ~ 0.8), normalised; queries likewise. Memories are filled to capacity.
Each repetition runs every method three times in a row (keeping the last two: a
training loop calls the same op again and again) and the methods take turns, in
alternating order, so a slow spell of a shared machine hits all of them; the table
reports the median over repetitions.
Recall@k is against float64 exact top-k (knnmem.eval.exact_search).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np
import torch

import knnmem
import knnmem.torch  # noqa: F401  (registers torch.ops.knnmem)
from knnmem.eval import exact_search, recall


def clustered(rng: np.random.Generator, grid: int, n: int, d: int) -> np.ndarray:
    centres = rng.standard_normal((grid, 256, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=-1, keepdims=True)
    labels = rng.integers(0, 256, (grid, n))
    noise = rng.standard_normal((grid, n, d)).astype(np.float32) * (0.8 / np.sqrt(d))
    rows = np.take_along_axis(centres, labels[..., None], 1) + noise
    return (rows / np.linalg.norm(rows, axis=-1, keepdims=True)).astype(np.float32)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(methods: dict, reps: int, inner: int = 3) -> dict[str, float]:
    """Median seconds per call of each method in steady state: every repetition runs
    each method `inner` times in a row and keeps all but the first call (which pays
    for the previous method's caches); methods are interleaved over repetitions."""
    for fn in methods.values():
        fn()  # warm-up (and compilation)
    times = {name: [] for name in methods}
    for rep in range(reps):
        order = list(methods) if rep % 2 == 0 else list(methods)[::-1]
        for name in order:
            calls = [timed(methods[name]) for _ in range(inner)]
            times[name] += calls[1:]
    return {name: statistics.median(t) for name, t in times.items()}


def ring(shape, capacity, d, seed):
    rng = np.random.default_rng(seed)
    grid = int(np.prod(shape))
    keys, values, written = knnmem.ops.init(shape, capacity, d)
    rows = clustered(rng, grid, capacity, d).reshape(*shape, capacity, d)
    knnmem.ops.add(keys, values, written, rows, -rows)
    queries = clustered(rng, grid, 512, d).reshape(*shape, 512, d)
    return (keys, values, written), rows, queries


def target_m1(reps: int, k: int = 32) -> list[dict]:
    (keys, values, written), rows, queries = ring((1,), 65536, 128, seed=1)
    tk, tv, tw, tq = map(torch.from_numpy, (keys, values, written, queries))
    mem = knnmem.Memory((1,), 65536, 128)
    mem.add(rows, -rows)
    exact_ring = torch.from_numpy(rows)  # torch baseline: [1, n, d] in stream order

    def torch_exact():
        return torch.topk(tq @ exact_ring.transpose(-1, -2), k, dim=-1)

    def op(precision):
        return lambda: torch.ops.knnmem.search(tk, tv, tw, tq, k, 0.9, "ip", precision)

    methods = {
        "torch.ops.knnmem.search": op("float32"),
        "torch.ops.knnmem.search bfloat16": op("bfloat16"),
        "torch.ops.knnmem.search int8": op("int8"),
        "torch matmul + topk (exact)": torch_exact,
        "knnmem.ops.search (numpy)": lambda: knnmem.ops.search(
            keys, values, written, queries, k=k, recall_target=0.9
        ),
        "knnmem.Memory.search": lambda: mem.search(queries, k=k, recall_target=0.9),
    }
    secs = measure(methods, reps)
    _, truth = exact_search(rows, queries, k)
    slot_of, _ = knnmem.ops.placement(65536)
    rec = {
        **{
            name: recall(methods[name]()[1].numpy(), truth)
            for name in methods
            if name.startswith("torch.ops.knnmem.search")
        },
        "torch matmul + topk (exact)": recall(torch_exact().indices.numpy(), truth),
        "knnmem.ops.search (numpy)": recall(
            knnmem.ops.search(keys, values, written, queries, k=k).indices, truth
        ),
        "knnmem.Memory.search": recall(mem.search(queries, k=k).indices, truth),
    }
    base = secs["torch matmul + topk (exact)"]
    return [
        {
            "workload": "M1",
            "method": name,
            "ms": 1e3 * s,
            "recall": rec[name],
            "vs torch": base / s,
        }
        for name, s in secs.items()
    ]


def target_m2(reps: int, compile_backend: str, k: int = 32) -> list[dict]:
    (keys, values, written), _, queries = ring((2, 8), 8192, 64, seed=2)
    tk, tv, tw, tq = map(torch.from_numpy, (keys, values, written, queries))

    def op(q):
        return torch.ops.knnmem.search(tk, tv, tw, q, k, 0.9, "ip")

    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend(compile_backend)(gm, example_inputs)

    compiled = torch.compile(op, backend=counting, fullgraph=True)
    methods = {
        "knnmem.ops.search (numpy)": lambda: knnmem.ops.search(
            keys, values, written, queries, k=k, recall_target=0.9
        ),
        "torch.ops.knnmem.search": lambda: op(tq),
        f"torch.compile(fullgraph, {compile_backend})": lambda: compiled(tq),
    }
    secs = measure(methods, reps)
    if len(graphs) != 1:
        raise AssertionError(f"expected one graph under torch.compile, got {len(graphs)}")
    same = all(
        torch.equal(a, torch.as_tensor(b))
        for a, b in zip(op(tq), knnmem.ops.search(keys, values, written, queries, k=k))
    )
    if not same:
        raise AssertionError("torch.ops.knnmem.search differs from knnmem.ops.search")
    base = secs["knnmem.ops.search (numpy)"]
    return [
        {
            "workload": "M2",
            "method": name,
            "ms": 1e3 * s,
            "overhead %": 100 * (s / base - 1),
        }
        for name, s in secs.items()
    ]


def dispatch_overhead_us(reps: int = 2000) -> dict[str, float]:
    """Per-call cost on a tiny memory (1 slot, 1 query): where dispatch shows."""
    keys, values, written = knnmem.ops.init((1,), 32, 8)
    q = np.zeros((1, 1, 8), np.float32)
    tk, tv, tw, tq = map(torch.from_numpy, (keys, values, written, q))
    methods = {
        "knnmem.ops.search (numpy)": lambda: knnmem.ops.search(keys, values, written, q, k=1),
        "torch.ops.knnmem.search": lambda: torch.ops.knnmem.search(tk, tv, tw, tq, 1, 0.9, "ip"),
    }
    out = {}
    for name, fn in methods.items():
        fn()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        out[name] = 1e6 * (time.perf_counter() - t0) / reps
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=11)
    parser.add_argument(
        "--compile-backend",
        default="aot_eager",
        help="torch.compile backend for the compiled row (inductor compiles for ~10 s)",
    )
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        if var in os.environ:
            print(f"warning: {var} is set; numpy/torch may run an old sgemm kernel")
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; torch "
        f"{torch.__version__} ({torch.get_num_threads()} threads); knnmem kernel "
        f"{knnmem._core.get_kernel()} ({knnmem.get_num_threads()} threads); "
        f"median of {args.reps}"
    )
    m1 = target_m1(args.reps)
    m2 = target_m2(args.reps, args.compile_backend)
    tiny = dispatch_overhead_us()

    print("\nTarget 1 -- M1: shape (1,), capacity 65536, d=128, Q=512, k=32")
    print("(goal: >= 4x faster than torch matmul + topk at recall >= 0.9)")
    print(f"| {'method':36s} | {'ms':>8s} | {'recall@32':>9s} | {'speed-up vs torch':>17s} |")
    print(f"|{'-' * 38}|{'-' * 9}:|{'-' * 10}:|{'-' * 18}:|")
    for r in m1:
        print(
            f"| {r['method']:36s} | {r['ms']:8.1f} | {r['recall']:9.3f} | {r['vs torch']:16.2f}x |"
        )
    print(
        "\nTarget 2 -- M2: shape (2, 8), capacity 8192, d=64, Q=512, k=32 (goal: overhead <= 10%)"
    )
    print(f"| {'method':36s} | {'ms':>8s} | {'overhead vs numpy':>17s} |")
    print(f"|{'-' * 38}|{'-' * 9}:|{'-' * 18}:|")
    for r in m2:
        print(f"| {r['method']:36s} | {r['ms']:8.1f} | {r['overhead %']:16.1f}% |")
    print(
        f"\nPer-call cost on a 32-slot memory, 1 query: numpy "
        f"{tiny['knnmem.ops.search (numpy)']:.1f} us, torch op "
        f"{tiny['torch.ops.knnmem.search']:.1f} us"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"M1": m1, "M2": m2, "tiny_call_us": tiny}, f, indent=2)


if __name__ == "__main__":
    main()
