// The AVX-512 vector type shared by scan_avx512.cpp and scan_avx512bf16.cpp
// (16 lanes, one panel per vector). Include only from units built with the
// AVX-512 flags; it lives in an anonymous namespace there.
#pragma once

#include <immintrin.h>

#include <cstdint>

// GCC 12 warns about the undefined vectors inside its own intrinsic headers.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace knnmem::cpu {
namespace {

struct VAvx512 {
  static constexpr int W = 16;
  static constexpr bool kMaskedStores = true;
  using F = __m512;
  using I = __m512i;
  using M = __mmask16;

  static F zero() { return _mm512_setzero_ps(); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static F load_f16(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static void store(float* p, F a) { _mm512_storeu_ps(p, a); }
  static F set1(float x) { return _mm512_set1_ps(x); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F min(F a, F b) { return _mm512_min_ps(a, b); }
  // vmaxps returns its second operand where either is NaN.
  static F floor(F v, F lo) { return _mm512_max_ps(v, lo); }
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
  static I load_slots(const int32_t* p) { return _mm512_loadu_si512(p); }
  static void store_slots(int32_t* p, I a) { _mm512_storeu_si512(p, a); }
  static I select_slots(M m, I a, I b) { return _mm512_mask_blend_epi32(m, b, a); }
  static I izero() { return _mm512_setzero_si512(); }
  static I load_words(const uint32_t* p) { return _mm512_loadu_si512(p); }
  static I set1_word(uint32_t w) { return _mm512_set1_epi32(static_cast<int>(w)); }
  // u8 x s8 pairs to int16 (no saturation: u < 128, |k| <= 127), then pairs to int32.
  // The empty asm keeps each sum's three instructions together, as in v_avx2.hpp:
  // without it GCC 12 issues a row's vpmaddubsw first and keeps the 6 x 4 tile's
  // accumulators on the stack (measured: int8 1.5x float32 instead of 1.9x).
  static I dot_u8s8(I acc, I q, I k) {
    const __m512i pairs = _mm512_maddubs_epi16(q, k);
    __m512i sum = _mm512_add_epi32(acc, _mm512_madd_epi16(pairs, _mm512_set1_epi16(1)));
    __asm__("" : "+v"(sum));
    return sum;
  }
  static I isub(I a, I b) { return _mm512_sub_epi32(a, b); }
  static I shl6(I a) { return _mm512_slli_epi32(a, 6); }
  static F to_float(I a) { return _mm512_cvtepi32_ps(a); }
  static F widen_even(const uint32_t* k) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_loadu_si512(k), 16));
  }
  static F widen_odd(const uint32_t* k) {
    return _mm512_castsi512_ps(
        _mm512_and_si512(_mm512_loadu_si512(k), _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
};

}  // namespace
}  // namespace knnmem::cpu
