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
void pack_int8_avx512(const float* rows, int64_t stride, int64_t n, int64_t dim, uint32_t* panels,
                      float* scale, int32_t* sum) {
  pack_int8_rows(rows, stride, n, dim, panels, scale, sum);
}

}  // namespace knnmem::cpu
