#!/usr/bin/env bash
# GPU verification of the CUDA engine in one call on a machine with an NVIDIA GPU:
# build with the CUDA kernels, run the GPU tests, a compute-sanitizer memcheck of a
# small run, and bench/cuda_bench.py. Logs and JSON go to $OUT (default /tmp/gpu_out).
#     bash scripts/gpu_check.sh [bench args...]
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
t0=$(date +%s)
stamp() { echo "== $1 ($(($(date +%s) - t0)) s)"; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv
python3 -c "import sys, torch, jax; print(sys.version.split()[0], torch.__version__, jax.__version__)"
stamp build
python3 -m pip install --no-build-isolation --no-deps -q \
  -C cmake.define.KNNMEM_CUDA=ON -C cmake.define.CMAKE_CUDA_ARCHITECTURES="${KNNMEM_ARCH:-90}" \
  -C build-dir=/tmp/knnmem-build . >"$OUT/build.log" 2>&1 || {
  tail -40 "$OUT/build.log"
  exit 1
}
python3 -c "import knnmem.cuda as c; print('cuda available:', c.available(), c.unavailable_reason())"
stamp tests
timeout ${TEST_TIMEOUT:-150} python3 -m pytest -q -p no:cacheprovider --tb=short -rfE tests/test_cuda.py \
  ${GPU_TESTS_EXTRA:-} 2>&1 | tee "$OUT/tests.log" | tail -30
stamp bench
timeout ${BENCH_TIMEOUT:-180} python3 bench/cuda_bench.py --json "$OUT/cuda.json" "$@" 2>&1 | tee "$OUT/bench.log"
stamp memcheck
timeout ${MEMCHECK_TIMEOUT:-90} compute-sanitizer --tool memcheck --print-limit 5 python3 scripts/gpu_smoke.py \
  2>&1 | tee "$OUT/memcheck.log" | tail -12
stamp done
