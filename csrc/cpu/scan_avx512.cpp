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

#include "cpu/scan_impl.hpp"

namespace knnmem::cpu {

void scan_avx512(const ScanArgs& args) { scan_any_format<V, 6, 4, 6, 3, 6, 4>(args); }

}  // namespace knnmem::cpu
