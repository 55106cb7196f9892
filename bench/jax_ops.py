"""knnmem.jax on CPU: the custom call against jax.lax.approx_max_k and the numpy path.

    pip install --no-build-isolation -e .     # knnmem._core with the XLA FFI handlers
    python bench/jax_ops.py                   # M1, M2 and add-vs-capacity (~2 min on 2 cores)
    python bench/jax_ops.py --quick           # fewer repeats
    python bench/jax_ops.py --json out.json

Three measurements, each on the same data for every method (clustered unit keys: per
memory 256 Gaussian cluster centres, rows = centre + noise with |noise| ~ 0.8, runs of
8 consecutive rows from one cluster; queries pick clusters independently):

1. M1 (shape (1,), capacity 65536, d=128, Q=512, k=32), recall target 0.9:
   jit(knnmem.jax.search) against jit(jax.lax.approx_max_k(queries @ keys.T, k,
   recall_target=0.9)) -- on CPU XLA falls back to an exact sort there. Time per call
   (median) and recall@k against float64 exact top-k. Target: >= 4x, recall >= 0.9.
2. M2 (shape (2, 8), capacity 8192, d=64, Q=512, k=32), recall target 0.9: the custom
   call under jit against knnmem.ops.search on numpy arrays (the same C++ function,
   called directly): the overhead of going through XLA. Target: <= 10%. The two
   alternate call by call, and the ratio is the median of per-pair ratios, so a
   machine that changes speed for a few seconds does not bias it.
3. add under jit with the state donated, T=512 rows, d=128, for capacities 4K..1M:
   time per call must not grow with capacity (the scatter is in place).

Timings from one run on one machine; compare ratios, not absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import knnmem
import knnmem.jax as kj
from knnmem.eval import exact_search, recall


def clustered(rng: np.random.Generator, g: int, n: int, d: int, run: int = 8) -> np.ndarray:
    """[g, n, d] unit rows from 256 clusters per memory, in runs of `run` rows."""
    centres = rng.standard_normal((g, 256, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=-1, keepdims=True)
    which = rng.integers(0, 256, (g, -(-n // run)))
    which = np.repeat(which, run, axis=1)[:, :n]
    rows = np.take_along_axis(centres, which[..., None], 1)
    rows = rows + rng.standard_normal((g, n, d)).astype(np.float32) * (0.8 / np.sqrt(d))
    return (rows / np.linalg.norm(rows, axis=-1, keepdims=True)).astype(np.float32)


def clustered_queries(rng: np.random.Generator, g: int, q: int, d: int) -> np.ndarray:
    return clustered(rng, g, q, d, run=1)


def timeit(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
    """Median seconds per call (fn blocks until done)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def filled_state(shape: tuple, capacity: int, d: int, seed: int):
    rng = np.random.default_rng(seed)
    g = int(np.prod(shape))
    keys = clustered(rng, g, capacity, d).reshape(*shape, capacity, d)
    values = -keys
    queries = clustered_queries(rng, g, 512, d).reshape(*shape, 512, d)
    state = kj.add(kj.init(shape, capacity, d), keys, values)
    return state, keys, queries


def bench_m1(repeats: int) -> dict:
    shape, cap, d, k, target = (1,), 65536, 128, 32, 0.9
    state, keys, queries = filled_state(shape, cap, d, seed=1)
    q = jnp.asarray(queries)

    knn = jax.jit(lambda s, q: kj.search(s, q, k, target))
    res = knn(state, q)
    jax.block_until_ready(res)

    # the rows in stream order (the state holds them permuted by the placement)
    stream_keys = jnp.asarray(keys)

    @jax.jit
    def approx(keys, q):
        scores = jnp.einsum("gqd,gnd->gqn", q, keys)
        return jax.lax.approx_max_k(scores, k, recall_target=target)

    a_scores, a_idx = approx(stream_keys, q)
    _, truth = exact_search(keys, queries, k)
    row = {
        "workload": "M1",
        "knnmem_ms": 1e3 * timeit(lambda: jax.block_until_ready(knn(state, q)), repeats),
        "approx_max_k_ms": 1e3
        * timeit(lambda: jax.block_until_ready(approx(stream_keys, q)), repeats),
        "knnmem_recall": recall(np.asarray(res.indices), truth),
        "approx_max_k_recall": recall(np.asarray(a_idx), truth),
    }
    row["speedup"] = row["approx_max_k_ms"] / row["knnmem_ms"]
    return row


def bench_m2(repeats: int) -> dict:
    shape, cap, d, k, target = (2, 8), 8192, 64, 32, 0.9
    state, _, queries = filled_state(shape, cap, d, seed=2)
    q = jnp.asarray(queries)
    ring = [np.asarray(a) for a in (state.keys, state.values, state.written)]
    written64 = ring[2].astype(np.int64)

    knn = jax.jit(lambda s, q: kj.search(s, q, k, target))
    jax.block_until_ready(knn(state, q))

    def numpy_call():
        return knnmem.ops.search(ring[0], ring[1], written64, queries, k=k, recall_target=target)

    def jax_call():
        return jax.block_until_ready(knn(state, q))

    same = all(
        np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(numpy_call(), knnmem.SearchResult(*jax_call()))
    )
    for _ in range(3):
        numpy_call(), jax_call()
    ratios, t_np, t_jax = [], [], []
    for _ in range(repeats):
        a = timeit(numpy_call, 1, warmup=0)
        b = timeit(jax_call, 1, warmup=0)
        t_np.append(a)
        t_jax.append(b)
        ratios.append(b / a)
    return {
        "workload": "M2",
        "numpy_ms": 1e3 * statistics.median(t_np),
        "jax_ms": 1e3 * statistics.median(t_jax),
        "overhead": statistics.median(ratios) - 1.0,
        "identical": same,
    }


def bench_add(repeats: int) -> list[dict]:
    d, t = 128, 512
    rng = np.random.default_rng(3)
    seg = jnp.asarray(rng.standard_normal((1, t, d), dtype=np.float32))
    add = jax.jit(kj.add, donate_argnums=0)
    rows = []
    for cap in (4096, 65536, 262144, 1048576):
        state = kj.init((1,), cap, d)
        box = [add(state, seg, seg)]

        def step(box=box):
            box[0] = add(box[0], seg, seg)
            jax.block_until_ready(box[0].written)

        rows.append({"capacity": cap, "add_us": 1e6 * timeit(step, repeats * 4, warmup=3)})
        del box
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    repeats = 5 if args.quick else 15
    if not kj.ffi_available():
        raise SystemExit("knnmem._core was built without the XLA FFI handlers")
    print(
        f"jax {jax.__version__} on {platform.processor() or platform.machine()}, "
        f"{knnmem.get_num_threads()} knnmem threads, kernel {knnmem._core.get_kernel()}"
    )
    m1 = bench_m1(repeats)
    print(
        f"\nM1 search, recall target 0.9 (shape (1,), capacity 65536, d=128, Q=512, k=32)\n"
        f"  method                          ms/call   recall@32\n"
        f"  knnmem.jax.search (custom call) {m1['knnmem_ms']:8.2f}   {m1['knnmem_recall']:.3f}\n"
        f"  jax.lax.approx_max_k            {m1['approx_max_k_ms']:8.2f}   "
        f"{m1['approx_max_k_recall']:.3f}\n"
        f"  speedup {m1['speedup']:.1f}x (target >= 4x)"
    )
    m2 = bench_m2(repeats * 2)
    print(
        f"\nM2 search, recall target 0.9 (shape (2, 8), capacity 8192, d=64, Q=512, k=32)\n"
        f"  knnmem.ops.search (numpy)       {m2['numpy_ms']:8.2f} ms\n"
        f"  knnmem.jax.search (custom call) {m2['jax_ms']:8.2f} ms\n"
        f"  overhead {100 * m2['overhead']:+.1f}% (target <= 10%), "
        f"results identical: {m2['identical']}"
    )
    adds = bench_add(repeats)
    print("\nadd under jit, state donated (T=512, d=128)")
    for r in adds:
        print(f"  capacity {r['capacity']:>8}  {r['add_us']:8.1f} us")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"M1": m1, "M2": m2, "add": adds}, f, indent=2)


if __name__ == "__main__":
    main()
