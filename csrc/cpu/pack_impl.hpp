// The row pack of the row-layout search, per SIMD variant: float32 rows into
// panels of the format scored in. This generic version (portable, NEON) is
// store_key row by row; AVX2 and AVX-512 convert bfloat16 and int8 rows with
// their own intrinsics (scan_avx2.cpp, scan_avx512.cpp), operation for
// operation as store_key does, so every variant writes the same words, scales
// and sums, bit for bit (tests/test_kernels.py::test_row_pack_matches_memory).
#pragma once

#include <cstdint>

#include "core/store_key.hpp"
#include "knnmem/knnmem.hpp"

namespace knnmem::cpu {
namespace {

// n float32 rows, `stride` floats apart, into panels: row j into lane
// j % kPanelSlots of panel j / kPanelSlots, with its int8 scale and sum.
inline void pack_rows(KeyFormat format, const float* rows, int64_t stride, int64_t n, int64_t dim,
                      uint32_t* panels, float* scale, int32_t* sum) {
  const int64_t words = key_words(format, dim);
  for (int64_t j = 0; j < n; ++j) {
    detail::store_key(format, rows + j * stride, dim, panels + (j - j % kPanelSlots) * words,
                      j % kPanelSlots, scale + j, sum + j, false);
  }
}

}  // namespace
}  // namespace knnmem::cpu
