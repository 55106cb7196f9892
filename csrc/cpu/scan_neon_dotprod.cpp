// NEON variant with the dot-product extension (ARMv8.2 dotprod: sdot for int8
// keys); built with +dotprod and only called after the run-time check in
// dispatch.cpp. See v_neon.hpp.
#include "cpu/kernels.hpp"
#include "cpu/scan_impl.hpp"
#include "cpu/v_neon.hpp"

namespace knnmem::cpu {

void scan_neon_dotprod(const ScanArgs& args) {
  scan_any_format<VNeon<true>, 6, 4, 6, 2, 6, 4>(args);
}

}  // namespace knnmem::cpu
