// The int8 row pack of the row-layout search, per SIMD variant. This generic
// version (portable, AVX2, NEON) runs quantize_int8 (core/quantize.hpp) with
// the variant's flags; GCC vectorises it only partly, so AVX-512 has its own
// intrinsics (scan_avx512.cpp). The product x * inv has two uses (the rounding
// add and copysign), so it is never fused into an FMA: every variant writes the
// words, scales and sums that store_key (baseline ISA) writes, bit for bit
// (tests/test_kernels.py::test_int8_row_pack_matches_memory).
#pragma once

#include <cstdint>

#include "core/quantize.hpp"
#include "knnmem/knnmem.hpp"

namespace knnmem::cpu {
namespace {

// n float32 rows, `stride` floats apart, quantised into int8 panels: row j into
// lane j % kPanelSlots of panel j / kPanelSlots (words dimension-major), with
// its scale and sum of levels.
inline void pack_int8_rows(const float* rows, int64_t stride, int64_t n, int64_t dim,
                           uint32_t* panels, float* scale, int32_t* sum) {
  const int64_t words = (dim + 3) / 4;
  for (int64_t j = 0; j < n; ++j) {
    uint32_t* dst = panels + (j / kPanelSlots) * kPanelSlots * words + j % kPanelSlots;
    scale[j] = detail::quantize_int8(rows + j * stride, dim, sum[j], [&](int64_t w, uint32_t word) {
      dst[w * kPanelSlots] = word;
    });
  }
}

}  // namespace
}  // namespace knnmem::cpu
