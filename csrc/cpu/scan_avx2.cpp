// AVX2 + FMA variant (8 lanes). Built with -mavx2 -mfma -mf16c; only called
// when the CPU reports all three.
#include <immintrin.h>

#include <algorithm>

#include "cpu/kernels.hpp"
#include "cpu/v_avx2.hpp"

namespace knnmem::cpu {
namespace {

struct V : VAvx2 {};

}  // namespace
}  // namespace knnmem::cpu

#include "cpu/pack_impl.hpp"
#include "cpu/scan_impl.hpp"
#include "cpu/select_impl.hpp"

namespace knnmem::cpu {

void scan_avx2(const ScanArgs& args) { scan_any_format<V, 4, 3, 6, 2, 5, 2>(args); }

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
