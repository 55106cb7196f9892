// A reference WMMA: every lane keeps the whole 16x16 tile; lane 0 stores.
// Checks the alignment rules (32-byte pointers, ldm multiples of 16 bytes).
#pragma once
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "cuda_runtime.h"

namespace nvcuda::wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

inline float to_f(float x) { return x; }
inline float to_f(__half x) { return __half2float(x); }
inline float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  float x[16][16];
};

inline void check_alignment(const void* p, unsigned ldm, size_t elem) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0 || (ldm * elem) % 16 != 0) {
    std::fprintf(stderr, "emu wmma: misaligned pointer %p or ldm %u\n", p, ldm);
    std::abort();
  }
}

template <typename Use, typename T, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  check_alignment(p, ldm, sizeof(T));
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) {
      // x[r][c]: row r, column c of the 16x16 operand
      const bool row = std::is_same_v<Layout, row_major>;
      f.x[r][c] = to_f(row ? p[r * ldm + c] : p[c * ldm + r]);
    }
  __syncwarp();
}

template <typename T>
void fill_fragment(fragment<accumulator, 16, 16, 16, T>& f, float v) {
  for (auto& row : f.x)
    for (float& e : row) e = v;
}

template <typename TA, typename LA, typename TB, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d,
              const fragment<matrix_a, 16, 16, 16, TA, LA>& a,
              const fragment<matrix_b, 16, 16, 16, TB, LB>& b,
              const fragment<accumulator, 16, 16, 16, float>& c) {
  fragment<accumulator, 16, 16, 16, float> out;
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) {
      float s = c.x[m][n];
      for (int k = 0; k < 16; ++k) s += a.x[m][k] * b.x[k][n];
      out.x[m][n] = s;
    }
  d = out;
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f,
                              unsigned ldm, layout_t layout) {
  check_alignment(p, ldm, sizeof(float));
  __syncwarp();
  if (threadIdx.x % 32 == 0) {
    for (int r = 0; r < 16; ++r)
      for (int c = 0; c < 16; ++c) {
        (layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.x[r][c];
      }
  }
  __syncwarp();
}
}  // namespace nvcuda::wmma

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
