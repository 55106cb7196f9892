// bfloat16 conversions for the baseline units (never included by the SIMD
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

}  // namespace knnmem::detail
