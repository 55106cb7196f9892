// AVX-512 variant (F, DQ, BW, VL). Built with those flags; only called when
// the CPU reports them. bfloat16 keys are widened to float32 here; CPUs with
// AVX512_BF16 run scan_avx512bf16.cpp instead.
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

void scan_avx512(const ScanArgs& args) {
  if (args.key_format == KeyFormat::kBFloat16) {
    Scan<V>{args}.run<KeyFormat::kBFloat16, 6, 3>();
  } else {
    Scan<V>{args}.run<KeyFormat::kFloat32, 6, 4>();
  }
}

}  // namespace knnmem::cpu
