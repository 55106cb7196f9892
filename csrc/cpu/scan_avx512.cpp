// AVX-512 variant (16 lanes, one panel per vector). Built with -mavx512f
// -mavx512dq -mavx512bw -mavx512vl; only called when the CPU reports them.
#include <immintrin.h>

// GCC 12 warns about the undefined vectors inside its own intrinsic headers.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include "cpu/kernels.hpp"

namespace knnmem::cpu {
namespace {

struct V {
  static constexpr int W = 16;
  using F = __m512;
  using I = __m512i;
  using M = __mmask16;

  static F zero() { return _mm512_setzero_ps(); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F a) { _mm512_storeu_ps(p, a); }
  static F set1(float x) { return _mm512_set1_ps(x); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F min(F a, F b) { return _mm512_min_ps(a, b); }
  static M gt(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
  static M from_bits(uint32_t bits) { return static_cast<M>(bits); }
  static uint32_t bits(M m) { return static_cast<uint32_t>(m); }
  static M mask_and(M a, M b) { return static_cast<M>(a & b); }
  static F select(M m, F a, F b) { return _mm512_mask_blend_ps(m, b, a); }
  static F mask_load(const float* p, M m) { return _mm512_maskz_loadu_ps(m, p); }
  static void mask_store(float* p, M m, F a) { _mm512_mask_storeu_ps(p, m, a); }
  static I slots(int32_t first) {
    return _mm512_add_epi32(_mm512_set1_epi32(first), _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8,
                                                                        9, 10, 11, 12, 13, 14, 15));
  }
  static void mask_store_slots(int32_t* p, M m, I a) { _mm512_mask_storeu_epi32(p, m, a); }
};

}  // namespace
}  // namespace knnmem::cpu

#include "cpu/scan_impl.hpp"

namespace knnmem::cpu {

void scan_avx512(const ScanArgs& args) { Scan<V>{args}.run<6, 4>(); }

}  // namespace knnmem::cpu
