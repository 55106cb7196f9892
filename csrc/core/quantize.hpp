// bfloat16 and int8 conversions for the baseline units (never included by the SIMD
// variants, so nothing here is shared with code built for another ISA).
#pragma once

#include <cstdint>
#include <cstring>

namespace knnmem::detail {

// Round to nearest even; inputs are finite (checked at the boundary).
static inline uint16_t to_bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

static inline float from_bf16(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}

// Word i of a bfloat16 pair row: dims 2i (low half) and 2i+1 (0 past dim).
static inline uint32_t bf16_pair(const float* x, int64_t dim, int64_t i) {
  const uint32_t lo = to_bf16(x[2 * i]);
  const uint32_t hi = 2 * i + 1 < dim ? to_bf16(x[2 * i + 1]) : 0u;
  return lo | (hi << 16);
}

// int8 row quantisation: q_i = round(x_i / scale), scale = max|x| / 127, so
// q_i in [-127, 127]. Writes ceil(dim / 4) words (4 dims each, lowest byte
// first, 0 past dim) through put(i, word); returns the scale and sets sum.
template <class Put>
static inline float quantize_int8(const float* x, int64_t dim, int32_t& sum, Put put) {
  float amax = 0.0f;
  for (int64_t i = 0; i < dim; ++i) amax = x[i] > amax ? x[i] : (-x[i] > amax ? -x[i] : amax);
  const float scale = amax / 127.0f;
  const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
  sum = 0;
  for (int64_t w = 0; w < (dim + 3) / 4; ++w) {
    uint32_t word = 0;
    for (int64_t b = 0; b < 4 && 4 * w + b < dim; ++b) {
      const float r = x[4 * w + b] * inv;
      const int32_t q = static_cast<int32_t>(r < 0 ? r - 0.5f : r + 0.5f);
      const int32_t c = q > 127 ? 127 : (q < -127 ? -127 : q);
      sum += c;
      word |= static_cast<uint32_t>(static_cast<uint8_t>(static_cast<int8_t>(c))) << (8 * b);
    }
    put(w, word);
  }
  return scale;
}

// Dim i of an int8 row stored as words, times its scale.
static inline float int8_at(const uint32_t* words, int64_t stride, int64_t i, float scale) {
  const uint32_t word = words[(i / 4) * stride];
  return static_cast<float>(static_cast<int8_t>(word >> (8 * (i % 4)))) * scale;
}

}  // namespace knnmem::detail
