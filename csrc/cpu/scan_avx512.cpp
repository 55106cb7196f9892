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

void scan_avx512(const ScanArgs& args) {
  if (args.key_format == KeyFormat::kBFloat16) {
    Scan<V>{args}.run<KeyFormat::kBFloat16, 6, 3>();
  } else if (args.key_format == KeyFormat::kInt8) {
    Scan<V>{args}.run<KeyFormat::kInt8, 6, 4>();
  } else {
    Scan<V>{args}.run<KeyFormat::kFloat32, 6, 4>();
  }
}

}  // namespace knnmem::cpu
