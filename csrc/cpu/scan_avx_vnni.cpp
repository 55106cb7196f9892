// AVX2 with AVX-VNNI: the VEX-encoded vpdpbusd on 256-bit vectors (Intel
// client CPUs since Alder Lake, AMD Zen 5; also present beside AVX-512 on Zen
// 4 and Sapphire Rapids). int8 keys are scored four u8 x s8 products per lane
// and instruction, accumulated in int32 -- the same integers as the
// vpmaddubsw/vpmaddwd pair of scan_avx2.cpp (no saturation: u < 128, |k| <=
// 127), in one instruction instead of three. Every other key format runs as
// in scan_avx2.cpp, whose selection loops and row pack this variant uses.
// Built with -mavx2 -mfma -mf16c -mavxvnni; only called when the CPU reports
// all four.
#include <immintrin.h>

#include "cpu/kernels.hpp"
#include "cpu/v_avx2.hpp"

namespace knnmem::cpu {
namespace {

struct V : VAvx2 {
  static I dot_u8s8(I acc, I q, I k) { return _mm256_dpbusd_avx_epi32(acc, q, k); }
};

}  // namespace
}  // namespace knnmem::cpu

#include "cpu/scan_impl.hpp"

namespace knnmem::cpu {

void scan_avx_vnni(const ScanArgs& args) { scan_any_format<V, 6, 2, 6, 2, 6, 2>(args); }

}  // namespace knnmem::cpu
