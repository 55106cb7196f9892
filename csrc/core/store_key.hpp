// One key written into panel storage in a key format. Shared by Memory::add
// (keys kept in the memory's format) and the search of row-layout keys, which
// packs blocks of float32 rows into panels of the format it scores in
// (SearchOptions::score_format): both produce the same words, scales, sums
// and norm terms, so both score a key the same way.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__SSE2__)
#include <xmmintrin.h>
#endif

#include "core/quantize.hpp"
#include "knnmem/knnmem.hpp"

namespace knnmem::detail {

// The per-slot norm term the kernels use: |k|^2 for l2, 1/|k| for cosine
// (0 for a zero key), nothing for ip.
inline float aux_of(Metric metric, float sq) {
  if (metric == Metric::kL2) return sq;
  if (metric == Metric::kCosine) return sq > 0.0f ? 1.0f / std::sqrt(sq) : 0.0f;
  return 0.0f;
}

// |x|^2 of dim values produced by at(i), summed in 16 interleaved partial sums
// (a fixed order, so the compiler can vectorise it).
template <class At>
inline float sum_squares(int64_t dim, At at) {
  constexpr int64_t kLanes = 16;
  float part[kLanes] = {};
  for (int64_t i0 = 0; i0 < dim; i0 += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      const float x = i0 + l < dim ? at(i0 + l) : 0.0f;
      part[l] += x * x;
    }
  }
  float sq = 0.0f;
  for (int64_t l = 0; l < kLanes; ++l) sq += part[l];
  return sq;
}

// |key|^2 of the key in slot `lane` of a panel as stored (rounded for
// bfloat16 and float16, levels times `scale` for int8): what gets scored.
inline float stored_sq(KeyFormat format, const void* panel, int64_t lane, int64_t dim,
                       float scale) {
  switch (format) {
    case KeyFormat::kFloat32: {
      const float* k = static_cast<const float*>(panel) + lane;
      return sum_squares(dim, [&](int64_t i) { return k[i * kPanelSlots]; });
    }
    case KeyFormat::kFloat16: {
      const uint16_t* k = static_cast<const uint16_t*>(panel) + lane;
      return sum_squares(dim, [&](int64_t i) { return from_f16(k[i * kPanelSlots]); });
    }
    case KeyFormat::kInt8: {
      const uint32_t* k = static_cast<const uint32_t*>(panel) + lane;
      return sum_squares(
          dim, [&](int64_t i) { return static_cast<float>(int8_dim(k, kPanelSlots, i)) * scale; });
    }
    default: {
      const uint32_t* k = static_cast<const uint32_t*>(panel) + lane;
      return sum_squares(dim, [&](int64_t i) { return from_bf16(bf16_dim(k, kPanelSlots, i)); });
    }
  }
}

// Stores `key` in slot `lane` of the panel whose first word is `panel`
// (kPanelSlots slots of key_words(format, dim) words, dimension-major). int8
// keys also get their scale and sum. Returns |stored key|^2 (stored_sq) when
// `norm` is set, else 0.
inline float store_key(KeyFormat format, const float* key, int64_t dim, void* panel, int64_t lane,
                       float* scale, int32_t* sum, bool norm) {
  if (format == KeyFormat::kFloat32) {
    float* dst = static_cast<float*>(panel) + lane;
    for (int64_t d = 0; d < dim; ++d) dst[d * kPanelSlots] = key[d];
  } else if (format == KeyFormat::kFloat16) {  // [dim rounded up to even][16] halves
    uint16_t* dst = static_cast<uint16_t*>(panel) + lane;
    for (int64_t d = 0; d < dim; ++d) dst[d * kPanelSlots] = to_f16(key[d]);
    if (dim % 2) dst[dim * kPanelSlots] = 0;
  } else if (format == KeyFormat::kInt8) {
    uint32_t* dst = static_cast<uint32_t*>(panel) + lane;
    *scale = quantize_int8(key, dim, *sum,
                           [&](int64_t w, uint32_t word) { dst[w * kPanelSlots] = word; });
  } else {
    uint32_t* dst = static_cast<uint32_t*>(panel) + lane;
    for (int64_t i = 0; i < (dim + 1) / 2; ++i) dst[i * kPanelSlots] = bf16_pair(key, dim, i);
  }
  return norm ? stored_sq(format, panel, lane, dim, scale ? *scale : 0.0f) : 0.0f;
}

// Four float32 keys, rows `stride` floats apart, into slots lane .. lane + 3
// of a panel: what four store_key calls write, a 4 x 4 transpose at a time (dim
// and lane multiples of 4). The row packs of the search use it (cpu/pack_impl.hpp).
inline void store_keys4_f32(const float* rows, int64_t stride, int64_t dim, float* panel,
                            int64_t lane) {
  float* dst = panel + lane;
#if defined(__SSE2__)
  for (int64_t i = 0; i < dim; i += 4) {
    __m128 r0 = _mm_loadu_ps(rows + i);
    __m128 r1 = _mm_loadu_ps(rows + stride + i);
    __m128 r2 = _mm_loadu_ps(rows + 2 * stride + i);
    __m128 r3 = _mm_loadu_ps(rows + 3 * stride + i);
    _MM_TRANSPOSE4_PS(r0, r1, r2, r3);  // r_d: dim i + d of the four rows
    _mm_storeu_ps(dst + i * kPanelSlots, r0);
    _mm_storeu_ps(dst + (i + 1) * kPanelSlots, r1);
    _mm_storeu_ps(dst + (i + 2) * kPanelSlots, r2);
    _mm_storeu_ps(dst + (i + 3) * kPanelSlots, r3);
  }
#else
  for (int64_t i = 0; i < dim; ++i) {
    for (int64_t r = 0; r < 4; ++r) dst[i * kPanelSlots + r] = rows[r * stride + i];
  }
#endif
}

}  // namespace knnmem::detail
