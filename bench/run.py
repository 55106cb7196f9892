"""The benchmark's old entry point, kept working: the same as `python -m knnmem.bench`.

The benchmark lives in the package (python/knnmem/bench/, installed with knnmem):
`python -m knnmem.bench --help` documents it. Developer-only benchmarks stay in bench/:
test_micro.py (pytest-benchmark kernel micro-benchmarks: python -m pytest
bench/test_micro.py --benchmark-only), jax_ops.py, torch_ops.py, cuda_bench.py and
pallas_gpu_probe.py.
"""

from __future__ import annotations

from knnmem.bench.__main__ import main

if __name__ == "__main__":
    main(prog="python bench/run.py")
