"""What a search costs when it writes only what the caller reads (workload M2).

M2 is a (2, 8) grid of memories of 8192 rows x 64 dims, 512 queries each, k=32: every
search returns 262,144 result rows, 67 MB of keys and 67 MB of values in float32. This
script times, in one process and in interleaved rounds (so that other load on the
machine hits every variant alike), the same search asked for different fields, in
different row dtypes and into caller buffers, and prints each as a ratio to the full
result:

    python bench/lean_results.py            # M2 as above
    python bench/lean_results.py --tiny     # a small grid, seconds (a smoke test)

Every variant's fields are checked against the full result first (bit for bit for
float32 rows; bfloat16 and float16 rows against the float32 rows rounded).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import knnmem
from knnmem import SearchResult
from knnmem.bench.machine import cpu_model


def _variants(mem: knnmem.Memory, q: np.ndarray, k: int) -> dict:
    shape = (*mem.shape, q.shape[-2], k)
    d, dv = mem.key_dim, mem.value_dim
    reuse = SearchResult(
        np.empty(shape, np.float32),
        np.empty(shape, np.int64),
        np.empty((*shape, d), np.float32),
        np.empty((*shape, dv), np.float32),
        np.empty(shape, bool),
    )
    kv = np.empty((*shape, 2, d), np.float32) if d == dv else None
    vals = np.empty((*shape, dv), np.float32)
    variants = {
        "all five fields (new arrays)": lambda: mem.search(q, k),
        "all five, out= reused": lambda: mem.search(q, k, out=reuse),
        "no keys (scores, indices, values, mask)": lambda: mem.search(
            q, k, fields=("scores", "indices", "values", "mask")
        ),
        "no keys, out= reused": lambda: mem.search(
            q, k, out=SearchResult(reuse.scores, reuse.indices, None, reuse.values, reuse.mask)
        ),
        "scores + indices only": lambda: mem.search(q, k, fields=("scores", "indices")),
        "values only (new array)": lambda: mem.search(q, k, fields="values"),
        "values only, out= reused": lambda: mem.search(
            q, k, out=SearchResult(None, None, None, vals, None)
        ),
        "scores + values, bfloat16 values": lambda: mem.search(
            q, k, fields=("scores", "values"), row_dtype="bfloat16"
        ),
    }
    if kv is not None:
        variants["keys|values interleaved into one out="] = lambda: mem.search(
            q, k, out=SearchResult(None, None, kv[..., 0, :], kv[..., 1, :], None)
        )
    return variants


def _check(variants: dict, full: SearchResult) -> None:
    """Every variant's fields equal the full result's (float32 exactly, 16-bit rows as
    the float32 rows rounded to nearest even)."""
    for name, run in variants.items():
        got = run()
        for field, want in zip(SearchResult._fields, full):
            have = getattr(got, field)
            if have is None:
                continue
            have = np.asarray(have)
            if have.dtype != want.dtype:
                want = want.astype(have.dtype)
            if not np.array_equal(have, want):
                raise AssertionError(f"{name}: {field} differs from the full result")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a small grid (a smoke test)")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    shape, cap, d, nq, k = ((2, 2), 1024, 32, 64, 8) if args.tiny else ((2, 8), 8192, 64, 512, 32)
    rounds = args.rounds or (3 if args.tiny else 9)
    rng = np.random.default_rng(0)
    mem = knnmem.Memory(shape, cap, d, d)
    for _ in range(4):
        rows = cap // 4
        mem.add(
            rng.standard_normal((*shape, rows, d), dtype=np.float32),
            rng.standard_normal((*shape, rows, d), dtype=np.float32),
        )
    q = rng.standard_normal((*shape, nq, d), dtype=np.float32)
    variants = _variants(mem, q, k)
    _check(variants, mem.search(q, k))
    times: dict[str, list[float]] = {name: [] for name in variants}
    for run in variants.values():  # warm-up: page faults of new outputs, caches
        run()
    for _ in range(rounds):
        for name, run in variants.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
    base = med["all five fields (new arrays)"]
    print(f"{cpu_model()}; kernel {knnmem._core.get_kernel()}, {knnmem.get_num_threads()} threads")
    print(f"grid {shape} x {cap} rows x {d} dims, {nq} queries each, k={k}, recall 0.9")
    print(f"{'search asked for':44s} {'median ms':>10s} {'speed-up':>9s}")
    for name, ms in med.items():
        print(f"{name:44s} {ms:10.1f} {base / ms:8.2f}x")
    si = med["scores + indices only"]
    lean = med["no keys (scores, indices, values, mask)"]
    print(f"no keys vs all five (new arrays): {base / lean:.2f}x")
    reused = med["all five, out= reused"] / med["no keys, out= reused"]
    print(f"no keys vs all five (out= reused): {reused:.2f}x")
    print(f"values only / scores + indices only: {med['values only (new array)'] / si:.2f}")
    vo = med["values only, out= reused"]
    print(f"values only, out= reused / scores + indices only: {vo / si:.2f}")


if __name__ == "__main__":
    main()
