// The int8 row pack of the row-layout search, compiled once per SIMD variant:
// quantize_int8 (core/quantize.hpp) is written in blocks of 16 independent
// lanes, which the variant's compiler flags turn into its vector width. Its
// only product (x * inv) has two uses (the rounding add and copysign), so it
// is never fused into an FMA: every variant writes the words, scales and sums
// that store_key (baseline ISA) writes, bit for bit.
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
