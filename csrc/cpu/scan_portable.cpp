// Portable variant: 4-lane GCC/Clang vector extensions, which compile to SSE2
// on x86-64 and NEON on aarch64. No FMA: products are rounded, then added.
#include <cstring>

#include "core/quantize.hpp"
#include "cpu/kernels.hpp"

namespace knnmem::cpu {
namespace {

struct V {
  static constexpr int W = 4;
  static constexpr bool kMaskedStores = false;
  static constexpr bool kNativeBF16 = false;
  typedef float F __attribute__((vector_size(16)));
  typedef int32_t I __attribute__((vector_size(16)));
  using M = I;  // all ones in the lanes that are set

  static F zero() { return F{0.0f, 0.0f, 0.0f, 0.0f}; }
  static F load(const float* p) {
    F r;
    std::memcpy(&r, p, sizeof(r));
    return r;
  }
  static void store(float* p, F a) { std::memcpy(p, &a, sizeof(a)); }
  static F load_f16(const uint16_t* p) {
    return F{detail::from_f16(p[0]), detail::from_f16(p[1]), detail::from_f16(p[2]),
             detail::from_f16(p[3])};
  }
  static F set1(float x) { return F{x, x, x, x}; }
  static F fma(F a, F b, F c) { return a * b + c; }
  static F mul(F a, F b) { return a * b; }
  static F add(F a, F b) { return a + b; }
  static F sub(F a, F b) { return a - b; }
  static F min(F a, F b) { return b < a ? b : a; }
  static F floor(F v, F lo) { return v > lo ? v : lo; }
  static M gt(F a, F b) { return a > b; }
  static M from_bits(uint32_t bits) {
    const I lane_bit = {1, 2, 4, 8};
    return (static_cast<int32_t>(bits) & lane_bit) != 0;
  }
  static uint32_t bits(M m) { return (m[0] & 1u) | (m[1] & 2u) | (m[2] & 4u) | (m[3] & 8u); }
  static M mask_and(M a, M b) { return a & b; }
  static F select(M m, F a, F b) { return m ? a : b; }
  static F mask_load(const float* p, M m) {
    F r = zero();
    for (int l = 0; l < W; ++l) {
      if (m[l]) r[l] = p[l];
    }
    return r;
  }
  static void mask_store(float* p, M m, F a) {
    for (int l = 0; l < W; ++l) {
      if (m[l]) p[l] = a[l];
    }
  }
  static I slots(int32_t first) { return I{first, first + 1, first + 2, first + 3}; }
  static I load_slots(const int32_t* p) {
    I r;
    std::memcpy(&r, p, sizeof(r));
    return r;
  }
  static void store_slots(int32_t* p, I a) { std::memcpy(p, &a, sizeof(a)); }
  static I select_slots(M m, I a, I b) { return m ? a : b; }
  static I izero() { return I{0, 0, 0, 0}; }
  static I load_words(const uint32_t* p) {
    I r;
    std::memcpy(&r, p, sizeof(r));
    return r;
  }
  static I set1_word(uint32_t w) {
    const int32_t x = static_cast<int32_t>(w);
    return I{x, x, x, x};
  }
  static I dot_u8s8(I acc, I q, I k) {  // q: unsigned bytes < 128, k: signed bytes
    for (int b = 0; b < 4; ++b) {
      const I qb = (q >> (8 * b)) & 0xFF;
      const I kb = (k << (24 - 8 * b)) >> 24;
      acc += qb * kb;
    }
    return acc;
  }
  static I isub(I a, I b) { return a - b; }
  static I shl6(I a) { return a << 6; }
  static F to_float(I a) { return __builtin_convertvector(a, F); }
  static F widen_half(const uint32_t* k, bool odd) {
    typedef uint32_t U __attribute__((vector_size(16)));
    U w;
    std::memcpy(&w, k, sizeof(w));
    const U h = odd ? (w & 0xFFFF0000u) : (w << 16);
    F f;
    std::memcpy(&f, &h, sizeof(f));
    return f;
  }
  static F widen_even(const uint32_t* k) { return widen_half(k, false); }
  static F widen_odd(const uint32_t* k) { return widen_half(k, true); }
  static void mask_store_slots(int32_t* p, M m, I a) {
    for (int l = 0; l < W; ++l) {
      if (m[l]) p[l] = a[l];
    }
  }
};

}  // namespace
}  // namespace knnmem::cpu

#include "cpu/pack_impl.hpp"
#include "cpu/scan_impl.hpp"
#include "cpu/select_impl.hpp"

namespace knnmem::cpu {

void scan_portable(const ScanArgs& args) { scan_any_format<V, 4, 2, 4, 2, 4, 2>(args); }

uint32_t kth_key_portable(const uint32_t* key, int64_t n, int64_t want, uint32_t lo, uint32_t hi) {
  return select_kth_key(key, n, want, lo, hi);
}
void rank_portable(const uint32_t* key, const int32_t* slot, int64_t m, int32_t* rank) {
  select_rank(key, slot, m, rank);
}
void pack_keys_portable(KeyFormat format, const float* rows, int64_t stride, int64_t n, int64_t dim,
                        uint32_t* panels, float* scale, int32_t* sum) {
  pack_rows(format, rows, stride, n, dim, panels, scale, sum);
}

}  // namespace knnmem::cpu
