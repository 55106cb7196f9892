// AVX-512 variant (F, DQ, BW, VL). Built with those flags; only called when
// the CPU reports them. bfloat16 keys are widened to float32 and int8 keys
// multiplied with vpmaddubsw here; CPUs with AVX512_BF16 and AVX512_VNNI run
// scan_avx512dl.cpp instead.
#include "cpu/kernels.hpp"
#include "cpu/v_avx512.hpp"

namespace knnmem::cpu {
namespace {

struct V : VAvx512 {
  static constexpr bool kNativeBF16 = false;
};

}  // namespace
}  // namespace knnmem::cpu

#include "cpu/pack_impl.hpp"
#include "cpu/scan_impl.hpp"
#include "cpu/select_impl.hpp"

namespace knnmem::cpu {

void scan_avx512(const ScanArgs& args) { scan_any_format<V, 6, 4, 6, 3, 6, 4>(args); }

uint32_t kth_key_avx512(const uint32_t* key, int64_t n, int64_t want, uint32_t lo, uint32_t hi) {
  return select_kth_key(key, n, want, lo, hi);
}
void rank_avx512(const uint32_t* key, const int32_t* slot, int64_t m, int32_t* rank) {
  select_rank(key, slot, m, rank);
}
namespace {

// Mask of the lanes of dims i0 .. i0 + 15 that are below dim.
__mmask16 live_lanes(int64_t dim, int64_t i0) {
  return dim - i0 >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (dim - i0)) - 1);
}

// quantize_int8 (core/quantize.hpp) 16 dimensions per vector, operation for
// operation: max |x| (exact in any order), q = trunc(r + copysign(0.5, r)) with
// r = x * inv rounded first (no FMA), clamped to +-127, dims past `dim` zero.
void pack_int8_row(const float* x, int64_t dim, uint32_t* dst, float* scale, int32_t* sum) {
  const int64_t words = (dim + 3) / 4;
  const __m512 sign = _mm512_set1_ps(-0.0f), half = _mm512_set1_ps(0.5f);
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
  __m512 amax = _mm512_setzero_ps();
  for (int64_t i0 = 0; i0 < dim; i0 += 16) {
    const __m512 v = _mm512_maskz_loadu_ps(live_lanes(dim, i0), x + i0);
    amax = _mm512_max_ps(amax, _mm512_andnot_ps(sign, v));
  }
  const float m = _mm512_reduce_max_ps(amax);
  *scale = m / 127.0f;
  const __m512 inv = _mm512_set1_ps(m > 0.0f ? 127.0f / m : 0.0f);
  __m512i total = _mm512_setzero_si512();
  for (int64_t i0 = 0; i0 < dim; i0 += 16) {
    const __m512 r = _mm512_mul_ps(_mm512_maskz_loadu_ps(live_lanes(dim, i0), x + i0), inv);
    const __m512 t = _mm512_add_ps(r, _mm512_or_ps(_mm512_and_ps(r, sign), half));
    const __m512i q = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvttps_epi32(t), lo), hi);
    total = _mm512_add_epi32(total, q);
    alignas(16) uint32_t w4[4];
    _mm_store_si128(reinterpret_cast<__m128i*>(w4), _mm512_cvtepi32_epi8(q));
    for (int64_t u = 0; u < 4 && i0 / 4 + u < words; ++u) dst[(i0 / 4 + u) * kPanelSlots] = w4[u];
  }
  *sum = _mm512_reduce_add_epi32(total);
}

// to_bf16 (core/quantize.hpp) 16 dimensions per vector: round to nearest even
// by integer arithmetic (denormals kept, unlike vcvtneps2bf16), pairs of dims
// per word, low dim first, a zero past an odd dim.
void pack_bf16_row(const float* x, int64_t dim, uint32_t* dst) {
  const int64_t words = (dim + 1) / 2;
  const __m512i bias = _mm512_set1_epi32(0x7FFF), one = _mm512_set1_epi32(1);
  for (int64_t i0 = 0; i0 < dim; i0 += 16) {
    const __m512i u = _mm512_castps_si512(_mm512_maskz_loadu_ps(live_lanes(dim, i0), x + i0));
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), one);
    const __m512i h = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(bias, odd)), 16);
    alignas(32) uint32_t w8[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(w8), _mm512_cvtepi32_epi16(h));
    for (int64_t u8 = 0; u8 < 8 && i0 / 2 + u8 < words; ++u8) {
      dst[(i0 / 2 + u8) * kPanelSlots] = w8[u8];
    }
  }
}

}  // namespace

void pack_keys_avx512(KeyFormat format, const float* rows, int64_t stride, int64_t n, int64_t dim,
                      uint32_t* panels, float* scale, int32_t* sum) {
  pack_rows_with(format, rows, stride, n, dim, panels, scale, sum, pack_int8_row, pack_bf16_row);
}

}  // namespace knnmem::cpu
