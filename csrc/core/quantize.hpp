// bfloat16 and int8 conversions for the baseline units (never included by the SIMD
// variants, so nothing here is shared with code built for another ISA).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "knnmem packs int8 keys and bfloat16 pairs for little-endian targets only"
#endif

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

// IEEE half precision, round to nearest even. Inputs are finite and within
// +-65504 (checked at the boundary); tiny values become subnormals or zero.
static inline uint16_t to_f16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t mag = u & 0x7FFFFFFFu;
  if (mag >= 0x38800000u) {  // >= 2^-14: a normal half
    // rebias the exponent (127 -> 15) and round the 13 dropped mantissa bits
    const uint32_t r = mag - 0x38000000u;
    const uint32_t rounded = r + 0x0FFFu + ((r >> 13) & 1u);
    return static_cast<uint16_t>(sign | (rounded >> 13));
  }
  if (mag < 0x33000000u) return static_cast<uint16_t>(sign);  // < 2^-25: rounds to zero
  // subnormal half: value = m * 2^-24 with m = round(|x| * 2^24)
  const uint32_t exp = mag >> 23;  // 102 .. 112
  const uint32_t mant = (mag & 0x7FFFFFu) | 0x800000u;
  const uint32_t shift = 126 - exp;  // 14 .. 24
  const uint32_t half = mant >> shift;
  const uint32_t rest = mant & ((1u << shift) - 1);
  const uint32_t mid = 1u << (shift - 1);
  const uint32_t up = rest > mid || (rest == mid && (half & 1u));
  return static_cast<uint16_t>(sign | (half + up));
}

static inline float from_f16(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  const uint32_t mant = h & 0x3FFu;
  uint32_t u;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24, exact in float32
    const float v = static_cast<float>(mant) * (1.0f / 16777216.0f);
    std::memcpy(&u, &v, sizeof(u));
    u |= sign;
  } else if (exp == 31) {
    u = sign | 0x7F800000u | (mant << 13);
  } else {
    u = sign | ((exp + 112) << 23) | (mant << 13);
  }
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

// Dim i of a key stored as bfloat16 pairs (above) or as int8 words (below), its
// words `stride` apart (kPanelSlots in a panel, 1 in a row).
static inline uint16_t bf16_dim(const uint32_t* words, int64_t stride, int64_t i) {
  return static_cast<uint16_t>(words[(i / 2) * stride] >> (16 * (i % 2)));
}
static inline int8_t int8_dim(const uint32_t* words, int64_t stride, int64_t i) {
  return static_cast<int8_t>(words[(i / 4) * stride] >> (8 * (i % 4)));
}

// int8 row quantisation: q_i = round(x_i / scale) (halves away from zero),
// scale = max|x| / 127, so q_i in [-127, 127]. Writes ceil(dim / 4) words (4
// dims each, lowest byte first, 0 past dim) through put(i, word); returns the
// scale and sets sum. Written in blocks of 16 dims with independent lanes so
// the compiler vectorises it (the result does not depend on that).
template <class Put>
static inline float quantize_int8(const float* x, int64_t dim, int32_t& sum, Put put) {
  constexpr int64_t kLanes = 16;
  // Block i0 of x, zero-padded past dim (whole blocks are read in place).
  float pad[kLanes];
  auto block = [&](int64_t i0) -> const float* {
    if (i0 + kLanes <= dim) return x + i0;
    for (int64_t l = 0; l < kLanes; ++l) pad[l] = i0 + l < dim ? x[i0 + l] : 0.0f;
    return pad;
  };
  float lane_max[kLanes] = {};
  for (int64_t i0 = 0; i0 < dim; i0 += kLanes) {
    const float* xb = block(i0);
    for (int64_t l = 0; l < kLanes; ++l) {
      const float a = std::fabs(xb[l]);
      lane_max[l] = a > lane_max[l] ? a : lane_max[l];
    }
  }
  float amax = 0.0f;
  for (int64_t l = 0; l < kLanes; ++l) amax = lane_max[l] > amax ? lane_max[l] : amax;
  const float scale = amax / 127.0f;
  const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
  int32_t lane_sum[kLanes] = {};
  const int64_t words = (dim + 3) / 4;
  for (int64_t i0 = 0; i0 < dim; i0 += kLanes) {
    const float* xb = block(i0);
    int8_t q[kLanes];
    for (int64_t l = 0; l < kLanes; ++l) {
      const float r = xb[l] * inv;
      const int32_t v = static_cast<int32_t>(r + std::copysign(0.5f, r));
      const int32_t c = v > 127 ? 127 : (v < -127 ? -127 : v);
      lane_sum[l] += c;
      q[l] = static_cast<int8_t>(c);
    }
    for (int64_t w = i0 / 4; w < i0 / 4 + kLanes / 4 && w < words; ++w) {
      uint32_t word;  // dims 4w .. 4w+3, lowest byte first (little-endian targets)
      std::memcpy(&word, q + 4 * w - i0, sizeof(word));
      put(w, word);
    }
  }
  sum = 0;
  for (int64_t l = 0; l < kLanes; ++l) sum += lane_sum[l];
  return scale;
}

}  // namespace knnmem::detail
