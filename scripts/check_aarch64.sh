#!/usr/bin/env bash
# Cross-builds the C++ core and its tests for aarch64 and runs them under qemu:
# the NEON variants against the portable one (tests/cpp/test_kernels.cpp) on a
# CPU model with the dot-product extension and on one without.
# Needs (Debian/Ubuntu): apt-get install g++-aarch64-linux-gnu qemu-user
set -euo pipefail
cd "$(dirname "$0")/.."
build="$(mktemp -d)"
trap 'rm -rf "$build"' EXIT
cmake -S . -B "$build" -DCMAKE_TOOLCHAIN_FILE=cmake/aarch64-linux-gnu.cmake \
  -DKNNMEM_PYTHON=OFF -DKNNMEM_BUILD_TESTS=ON -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build" -j"$(nproc)" >/dev/null
for cpu in neoverse-n1 cortex-a53; do
  echo "== qemu-aarch64 -cpu $cpu"
  for t in knnmem_kernels_test knnmem_core_test knnmem_example; do
    qemu-aarch64 -cpu "$cpu" "$build/$t" | tail -n 2
  done
done
