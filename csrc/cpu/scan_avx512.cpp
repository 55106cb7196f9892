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
// quantize_int8 (core/quantize.hpp) 16 dimensions per vector, operation for
// operation: max |x| (exact in any order), q = trunc(x * inv + copysign(0.5,
// x * inv)) as a product, then a sum (no FMA), clamped to +-127, dims past
// `dim` zero; same words, scale and sum as the scalar code, bit for bit (the
// compiler does not vectorise that code well: it has a scalar tail per block).
void pack_int8_avx512(const float* rows, int64_t stride, int64_t n, int64_t dim, uint32_t* panels,
                      float* scale, int32_t* sum) {
  const int64_t words = (dim + 3) / 4;
  const __m512 sign = _mm512_set1_ps(-0.0f), half = _mm512_set1_ps(0.5f);
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
  for (int64_t j = 0; j < n; ++j) {
    const float* x = rows + j * stride;
    uint32_t* dst = panels + (j / kPanelSlots) * kPanelSlots * words + j % kPanelSlots;
    auto load = [&](int64_t i0) {
      const __mmask16 live = dim - i0 >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (dim - i0)) - 1);
      return _mm512_maskz_loadu_ps(live, x + i0);
    };
    __m512 amax = _mm512_setzero_ps();
    for (int64_t i0 = 0; i0 < dim; i0 += 16)
      amax = _mm512_max_ps(amax, _mm512_andnot_ps(sign, load(i0)));
    const float m = _mm512_reduce_max_ps(amax);
    scale[j] = m / 127.0f;
    const __m512 inv = _mm512_set1_ps(m > 0.0f ? 127.0f / m : 0.0f);
    __m512i total = _mm512_setzero_si512();
    for (int64_t i0 = 0; i0 < dim; i0 += 16) {
      const __m512 r = _mm512_mul_ps(load(i0), inv);
      const __m512 t = _mm512_add_ps(r, _mm512_or_ps(_mm512_and_ps(r, sign), half));
      const __m512i q = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvttps_epi32(t), lo), hi);
      total = _mm512_add_epi32(total, q);
      alignas(16) uint32_t w4[4];
      _mm_store_si128(reinterpret_cast<__m128i*>(w4), _mm512_cvtepi32_epi8(q));
      for (int64_t u = 0; u < 4 && i0 / 4 + u < words; ++u) dst[(i0 / 4 + u) * kPanelSlots] = w4[u];
    }
    sum[j] = _mm512_reduce_add_epi32(total);
  }
}

}  // namespace knnmem::cpu
