// AVX-512 with AVX512_BF16 and AVX512_VNNI (the "deep learning" extensions):
// bfloat16 keys are scored by vdpbf16ps, which multiplies pairs of bfloat16
// (keys and queries rounded to bfloat16) and accumulates in float32, and int8
// keys by vpdpbusd (four u8 x s8 products per lane into int32) -- two and four
// times the multiply-adds of a float32 FMA per instruction, on half and a
// quarter of the bytes. float32 keys run as in scan_avx512.cpp.
#include "cpu/kernels.hpp"
#include "cpu/v_avx512.hpp"

namespace knnmem::cpu {
namespace {

struct V : VAvx512 {
  static constexpr bool kNativeBF16 = true;
  static F dot_bf16(F acc, I q, I k) {
    return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh&>(q), reinterpret_cast<__m512bh&>(k));
  }
  static I dot_u8s8(I acc, I q, I k) { return _mm512_dpbusd_epi32(acc, q, k); }
};

}  // namespace
}  // namespace knnmem::cpu

#include "cpu/scan_impl.hpp"

namespace knnmem::cpu {

void scan_avx512dl(const ScanArgs& args) { scan_any_format<V, 6, 4, 6, 4, 6, 4>(args); }

}  // namespace knnmem::cpu
