// The AVX2 + FMA vector type (8 lanes) shared by scan_avx2.cpp and
// scan_avx_vnni.cpp. Include only from units built with -mavx2 -mfma -mf16c;
// it lives in an anonymous namespace there.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace knnmem::cpu {
namespace {

struct VAvx2 {
  static constexpr int W = 8;
  // vmaskmovps stores are slow on several x86 cores: blend and store instead
  static constexpr bool kMaskedStores = false;
  static constexpr bool kNativeBF16 = false;
  using F = __m256;
  using I = __m256i;
  using M = __m256;

  static F zero() { return _mm256_setzero_ps(); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static F load_f16(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static void store(float* p, F a) { _mm256_storeu_ps(p, a); }
  static F set1(float x) { return _mm256_set1_ps(x); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F min(F a, F b) { return _mm256_min_ps(a, b); }
  // vmaxps returns its second operand where either is NaN.
  static F floor(F v, F lo) { return _mm256_max_ps(v, lo); }
  static M gt(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
  static M from_bits(uint32_t bits) {
    const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256i set = _mm256_and_si256(_mm256_set1_epi32(static_cast<int>(bits)), lane_bit);
    return _mm256_castsi256_ps(_mm256_cmpeq_epi32(set, lane_bit));
  }
  static uint32_t bits(M m) { return static_cast<uint32_t>(_mm256_movemask_ps(m)); }
  static M mask_and(M a, M b) { return _mm256_and_ps(a, b); }
  static F select(M m, F a, F b) { return _mm256_blendv_ps(b, a, m); }
  static F mask_load(const float* p, M m) { return _mm256_maskload_ps(p, _mm256_castps_si256(m)); }
  static void mask_store(float* p, M m, F a) { _mm256_maskstore_ps(p, _mm256_castps_si256(m), a); }
  static I slots(int32_t first) {
    return _mm256_add_epi32(_mm256_set1_epi32(first), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static void mask_store_slots(int32_t* p, M m, I a) {
    _mm256_maskstore_epi32(reinterpret_cast<int*>(p), _mm256_castps_si256(m), a);
  }
  static I load_slots(const int32_t* p) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  }
  static void store_slots(int32_t* p, I a) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), a);
  }
  static I select_slots(M m, I a, I b) {
    return _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(b), _mm256_castsi256_ps(a), m));
  }
  static I izero() { return _mm256_setzero_si256(); }
  static I load_words(const uint32_t* p) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  }
  static I set1_word(uint32_t w) { return _mm256_set1_epi32(static_cast<int>(w)); }
  // u8 x s8 pairs to int16 (no saturation: u < 128, |k| <= 127), then pairs to int32.
  // The empty asm keeps each sum's three instructions together: without it
  // GCC issues all of a tile's vpmaddubsw first, needs a register for each
  // product and spills accumulators to the stack (GCC 12, 5 x 2 tile).
  static I dot_u8s8(I acc, I q, I k) {
    const __m256i pairs = _mm256_maddubs_epi16(q, k);
    __m256i sum = _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
    __asm__("" : "+x"(sum));
    return sum;
  }
  static I isub(I a, I b) { return _mm256_sub_epi32(a, b); }
  static I shl6(I a) { return _mm256_slli_epi32(a, 6); }
  static F to_float(I a) { return _mm256_cvtepi32_ps(a); }
  static F widen_even(const uint32_t* k) {
    return _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(k)), 16));
  }
  // Two shifts rather than an AND: no mask constant to hold in a register (a
  // 6 x 2 tile leaves one free).
  static F widen_odd(const uint32_t* k) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_srli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(k)), 16), 16));
  }
};

}  // namespace
}  // namespace knnmem::cpu
