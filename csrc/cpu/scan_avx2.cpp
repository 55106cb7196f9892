// AVX2 + FMA variant (8 lanes). Built with -mavx2 -mfma -mf16c; only called
// when the CPU reports all three.
#include <immintrin.h>

#include <algorithm>

#include "cpu/kernels.hpp"

namespace knnmem::cpu {
namespace {

struct V {
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
  static I dot_u8s8(I acc, I q, I k) {
    const __m256i pairs = _mm256_maddubs_epi16(q, k);
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
  }
  static I isub(I a, I b) { return _mm256_sub_epi32(a, b); }
  static I shl6(I a) { return _mm256_slli_epi32(a, 6); }
  static F to_float(I a) { return _mm256_cvtepi32_ps(a); }
  static void widen_bf16(const uint32_t* k, F& even, F& odd) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(k));
    even = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
    odd =
        _mm256_castsi256_ps(_mm256_and_si256(w, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
};

}  // namespace
}  // namespace knnmem::cpu

#include "cpu/pack_impl.hpp"
#include "cpu/scan_impl.hpp"
#include "cpu/select_impl.hpp"

namespace knnmem::cpu {

void scan_avx2(const ScanArgs& args) { scan_any_format<V, 6, 2, 4, 2, 4, 2>(args); }

uint32_t kth_key_avx2(const uint32_t* key, int64_t n, int64_t want, uint32_t lo, uint32_t hi) {
  return select_kth_key(key, n, want, lo, hi);
}
void rank_avx2(const uint32_t* key, const int32_t* slot, int64_t m, int32_t* rank) {
  select_rank(key, slot, m, rank);
}
namespace {

// Lanes of dims i0 .. i0 + 7 below dim, as a vmaskmovps mask (all ones = load).
__m256i live_lanes(int64_t dim, int64_t i0) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(dim - i0, 8))),
                            lane);
}

float max8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
}

// quantize_int8 (core/quantize.hpp) 8 dimensions per vector, operation for
// operation, as pack_int8_row of scan_avx512.cpp.
void pack_int8_row(const float* x, int64_t dim, uint32_t* dst, float* scale, int32_t* sum) {
  const int64_t words = (dim + 3) / 4;
  const __m256 sign = _mm256_set1_ps(-0.0f), half = _mm256_set1_ps(0.5f);
  const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
  __m256 amax = _mm256_setzero_ps();
  for (int64_t i0 = 0; i0 < dim; i0 += 8) {
    const __m256 v = _mm256_maskload_ps(x + i0, live_lanes(dim, i0));
    amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v));
  }
  const float m = max8(amax);
  *scale = m / 127.0f;
  const __m256 inv = _mm256_set1_ps(m > 0.0f ? 127.0f / m : 0.0f);
  __m256i total = _mm256_setzero_si256();
  for (int64_t i0 = 0; i0 < dim; i0 += 8) {
    const __m256 r = _mm256_mul_ps(_mm256_maskload_ps(x + i0, live_lanes(dim, i0)), inv);
    const __m256 t = _mm256_add_ps(r, _mm256_or_ps(_mm256_and_ps(r, sign), half));
    const __m256i q = _mm256_min_epi32(_mm256_max_epi32(_mm256_cvttps_epi32(t), lo), hi);
    total = _mm256_add_epi32(total, q);
    // Per 128-bit half: 4 levels -> 4 bytes in the half's first word.
    const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(q, q), _mm256_packs_epi32(q, q));
    const uint32_t w[2] = {static_cast<uint32_t>(_mm256_extract_epi32(b, 0)),
                           static_cast<uint32_t>(_mm256_extract_epi32(b, 4))};
    for (int64_t u = 0; u < 2 && i0 / 4 + u < words; ++u) dst[(i0 / 4 + u) * kPanelSlots] = w[u];
  }
  __m128i t4 = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
  t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0x4E));
  t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0xB1));
  *sum = _mm_cvtsi128_si32(t4);
}

// to_bf16 (core/quantize.hpp) 8 dimensions per vector: round to nearest even by
// integer arithmetic, pairs of dims per word, low dim first.
void pack_bf16_row(const float* x, int64_t dim, uint32_t* dst) {
  const int64_t words = (dim + 1) / 2;
  const __m256i bias = _mm256_set1_epi32(0x7FFF), one = _mm256_set1_epi32(1);
  for (int64_t i0 = 0; i0 < dim; i0 += 8) {
    const __m256i u = _mm256_castps_si256(_mm256_maskload_ps(x + i0, live_lanes(dim, i0)));
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), one);
    const __m256i h = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(bias, odd)), 16);
    const __m256i p = _mm256_packus_epi32(h, h);  // per half: 4 halves in its first 2 words
    const uint32_t w[4] = {static_cast<uint32_t>(_mm256_extract_epi32(p, 0)),
                           static_cast<uint32_t>(_mm256_extract_epi32(p, 1)),
                           static_cast<uint32_t>(_mm256_extract_epi32(p, 4)),
                           static_cast<uint32_t>(_mm256_extract_epi32(p, 5))};
    for (int64_t u4 = 0; u4 < 4 && i0 / 2 + u4 < words; ++u4) {
      dst[(i0 / 2 + u4) * kPanelSlots] = w[u4];
    }
  }
}

}  // namespace

void pack_keys_avx2(KeyFormat format, const float* rows, int64_t stride, int64_t n, int64_t dim,
                    uint32_t* panels, float* scale, int32_t* sum) {
  pack_rows_with(format, rows, stride, n, dim, panels, scale, sum, pack_int8_row, pack_bf16_row);
}

}  // namespace knnmem::cpu
