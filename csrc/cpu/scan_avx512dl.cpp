// AVX-512 with AVX512_BF16: bfloat16 keys scored by vdpbf16ps, which
// multiplies pairs of bfloat16 (keys and queries rounded to bfloat16) and
// accumulates in float32 -- twice the multiply-adds of a float32 FMA per
// instruction and half the bytes of keys. float32 keys run as in scan_avx512.
#include "cpu/kernels.hpp"
#include "cpu/v_avx512.hpp"

namespace knnmem::cpu {
namespace {

struct V : VAvx512 {
  static constexpr bool kNativeBF16 = true;
  static I load_words(const uint32_t* p) { return _mm512_loadu_si512(p); }
  static I set1_word(uint32_t w) { return _mm512_set1_epi32(static_cast<int>(w)); }
  static F dot_bf16(F acc, I q, I k) {
    return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh&>(q), reinterpret_cast<__m512bh&>(k));
  }
};

}  // namespace
}  // namespace knnmem::cpu

#include "cpu/scan_impl.hpp"

namespace knnmem::cpu {

void scan_avx512bf16(const ScanArgs& args) {
  if (args.key_format == KeyFormat::kBFloat16) {
    Scan<V>{args}.run<KeyFormat::kBFloat16, 6, 4>();
  } else {
    Scan<V>{args}.run<KeyFormat::kFloat32, 6, 4>();
  }
}

}  // namespace knnmem::cpu
