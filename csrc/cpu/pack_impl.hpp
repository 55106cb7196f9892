// The row pack of the row-layout search, per SIMD variant: float32 rows into
// panels of the format scored in. This generic version (portable, NEON; float32
// and float16 everywhere) is store_key's rule; AVX2 and AVX-512 convert bfloat16 and int8 rows with
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
// float32 rows go four at a time where dim allows (store_keys4_f32).
inline void pack_rows(KeyFormat format, const float* rows, int64_t stride, int64_t n, int64_t dim,
                      uint32_t* panels, float* scale, int32_t* sum) {
  const int64_t words = key_words(format, dim);
  int64_t j = 0;
  if (format == KeyFormat::kFloat32 && dim % 4 == 0) {
    for (; j + 4 <= n; j += 4) {
      detail::store_keys4_f32(rows + j * stride, stride, dim,
                              reinterpret_cast<float*>(panels + (j - j % kPanelSlots) * words),
                              j % kPanelSlots);
    }
  }
  for (; j < n; ++j) {
    detail::store_key(format, rows + j * stride, dim, panels + (j - j % kPanelSlots) * words,
                      j % kPanelSlots, scale + j, sum + j, false);
  }
}

// pack_rows with a variant's own row converters for int8 and bfloat16:
// int8_row(x, dim, lane_words, &scale, &sum) and bf16_row(x, dim, lane_words)
// write one row's words kPanelSlots apart from lane_words.
template <class Int8Row, class BF16Row>
inline void pack_rows_with(KeyFormat format, const float* rows, int64_t stride, int64_t n,
                           int64_t dim, uint32_t* panels, float* scale, int32_t* sum,
                           Int8Row int8_row, BF16Row bf16_row) {
  if (format != KeyFormat::kInt8 && format != KeyFormat::kBFloat16) {
    pack_rows(format, rows, stride, n, dim, panels, scale, sum);
    return;
  }
  const int64_t words = key_words(format, dim);
  for (int64_t j = 0; j < n; ++j) {
    uint32_t* dst = panels + (j - j % kPanelSlots) * words + j % kPanelSlots;
    if (format == KeyFormat::kInt8) {
      int8_row(rows + j * stride, dim, dst, scale + j, sum + j);
    } else {
      bf16_row(rows + j * stride, dim, dst);
    }
  }
}

}  // namespace
}  // namespace knnmem::cpu
