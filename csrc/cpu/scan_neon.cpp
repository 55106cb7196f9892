// NEON variant for aarch64, base ISA (Advanced SIMD); see v_neon.hpp. int8
// keys use widening multiplies here, sdot in scan_neon_dotprod.cpp.
#include "cpu/kernels.hpp"
#include "cpu/scan_impl.hpp"
#include "cpu/v_neon.hpp"

namespace knnmem::cpu {

void scan_neon(const ScanArgs& args) { scan_any_format<VNeon<false>, 6, 4, 6, 2, 6, 4>(args); }

}  // namespace knnmem::cpu
