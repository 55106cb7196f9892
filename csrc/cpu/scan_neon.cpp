// NEON variant for aarch64, base ISA (Advanced SIMD); see v_neon.hpp. int8
// keys use widening multiplies here, sdot in scan_neon_dotprod.cpp.
#include "cpu/kernels.hpp"
#include "cpu/pack_impl.hpp"
#include "cpu/scan_impl.hpp"
#include "cpu/select_impl.hpp"
#include "cpu/v_neon.hpp"

namespace knnmem::cpu {

void scan_neon(const ScanArgs& args) { scan_any_format<VNeon<false>, 6, 4, 6, 2, 6, 4>(args); }

uint32_t kth_key_neon(const uint32_t* key, int64_t n, int64_t want, uint32_t lo, uint32_t hi) {
  return select_kth_key(key, n, want, lo, hi);
}
void rank_neon(const uint32_t* key, const int32_t* slot, int64_t m, int32_t* rank) {
  select_rank(key, slot, m, rank);
}
void pack_keys_neon(KeyFormat format, const float* rows, int64_t stride, int64_t n, int64_t dim,
                    uint32_t* panels, float* scale, int32_t* sum) {
  pack_rows(format, rows, stride, n, dim, panels, scale, sum);
}

}  // namespace knnmem::cpu
