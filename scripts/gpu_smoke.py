"""Small CUDA smoke run for compute-sanitizer: every key dtype and metric, add past
capacity, clear, search in both modes, compared with the CPU engine's float32 scores.

    compute-sanitizer --tool memcheck python3 scripts/gpu_smoke.py

numpy in and out only (no torch), so the sanitizer sees knnmem's kernels alone.
"""

import sys

import numpy as np

import knnmem
import knnmem.cuda as kcuda


def main() -> int:
    if not kcuda.available():
        print(f"gpu_smoke: skipped: {kcuda.unavailable_reason()}")
        return 2
    rng = np.random.default_rng(0)
    worst = 0.0
    failures = []
    for dtype in ("float32", "bfloat16", "float16"):
        for metric in ("ip", "cosine", "l2"):
            for capacity, d, rows in ((200, 24, 500), (1024, 64, 1100)):
                gpu = knnmem.Memory(
                    (2, 3), capacity=capacity, key_dim=d, dtype=dtype, metric=metric, device="cuda"
                )
                cpu = knnmem.Memory(
                    (2, 3), capacity=capacity, key_dim=d, dtype=dtype, metric=metric
                )
                for start in range(0, rows, 97):
                    n = min(97, rows - start)
                    k = rng.standard_normal((2, 3, n, d), dtype=np.float32)
                    v = rng.standard_normal((2, 3, n, d), dtype=np.float32)
                    gpu.add(k, v)
                    cpu.add(k, v)
                mask = np.zeros((2, 3), bool)
                mask[1, 2] = True
                gpu.clear(mask)
                cpu.clear(mask)
                q = rng.standard_normal((2, 3, 37, d), dtype=np.float32)
                for target in (1.0, 0.9):
                    g = gpu.search(q, 8, recall_target=target)
                    c = cpu.search(q, 8, recall_target=target)
                    gs, cs = np.asarray(g.scores), np.asarray(c.scores)
                    if target == 1.0:
                        same_holes = np.array_equal(np.isfinite(gs), np.isfinite(cs))
                        fin = np.isfinite(cs) & np.isfinite(gs)
                        err = float(
                            np.max(np.abs(gs[fin] - cs[fin]) / np.maximum(1, np.abs(cs[fin])))
                        )
                        worst = max(worst, err)
                        if err > 1e-3 or not same_holes:
                            failures.append((dtype, metric, capacity, err, same_holes))
    print(f"gpu_smoke: worst relative exact-score difference vs CPU {worst:.2e}")
    for dtype, metric, capacity, err, same in failures:
        print(f"gpu_smoke: FAILED {dtype} {metric} capacity={capacity} rel.err={err:.2e} {same=}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
