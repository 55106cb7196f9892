// mma.sync.m16n8k16 for the CUDA emulation: the warp's lanes exchange their
// fragments and each computes its four accumulator elements (emu::mma_16816).
#pragma once
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "cuda_runtime.h"

namespace emu {
inline float half_bits_to_float(uint16_t bits, const __nv_bfloat16*) {
  return __bfloat162float(__nv_bfloat16{bits});
}
inline float half_bits_to_float(uint16_t bits, const __half*) {
  __half h;
  std::memcpy(&h, &bits, sizeof(h));
  return __half2float(h);
}

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}: the warp's lanes publish their
// fragments, then each lane computes its four elements of D from the whole of A
// and B, laid out as the PTX ISA specifies (g = lane / 4, t = lane % 4).
template <typename T>
void mma_16816(float& d0, float& d1, float& d2, float& d3, const uint32_t (&a)[4], uint32_t b0,
               uint32_t b1) {
  const unsigned lane = threadIdx.x % 32;
  uint32_t* x = ctx.warp_mma;
  for (int r = 0; r < 4; ++r) x[lane * 6 + r] = a[r];
  x[lane * 6 + 4] = b0;
  x[lane * 6 + 5] = b1;
  __syncwarp();
  auto half = [&](unsigned src_lane, int reg, int which) {
    const uint32_t w = x[src_lane * 6 + reg];
    return half_bits_to_float(static_cast<uint16_t>(which ? w >> 16 : w & 0xFFFFu),
                              static_cast<const T*>(nullptr));
  };
  // A[m][k]: lane (m % 8) * 4 + (k % 8) / 2, register (m >= 8) + 2 (k >= 8), half k % 2.
  auto A = [&](int m, int k) {
    return half((m % 8) * 4 + (k % 8) / 2, (m >= 8) + 2 * (k >= 8), k % 2);
  };
  // B[k][n]: lane n * 4 + (k % 8) / 2, register 4 + (k >= 8), half k % 2.
  auto B = [&](int k, int n) { return half(n * 4 + (k % 8) / 2, 4 + (k >= 8), k % 2); };
  float* d[4] = {&d0, &d1, &d2, &d3};
  float out[4];
  for (int i = 0; i < 4; ++i) {
    const int m = lane / 4 + (i >= 2 ? 8 : 0), n = (lane % 4) * 2 + (i & 1);
    float s = *d[i];
    for (int k = 0; k < 16; ++k) s += A(m, k) * B(k, n);
    out[i] = s;
  }
  __syncwarp();
  for (int i = 0; i < 4; ++i) *d[i] = out[i];
}
}  // namespace emu
