// The NEON vector type shared by scan_neon.cpp and scan_neon_dotprod.cpp
// (aarch64, 4 lanes): float32 keys with fused multiply-adds (vfmaq_f32),
// float16 keys widened by vcvt_f32_f16, bfloat16 keys widened by shifts, int8
// keys by sdot (vdotq_s32: four s8 x s8 products per lane; the 7-bit queries,
// 1 .. 127, are the same numbers read as signed bytes) where the CPU has the
// dot-product extension, or by widening multiplies -- both give the integers
// every other variant computes. Include only from those two units; it lives
// in an anonymous namespace there.
#pragma once

#include <arm_neon.h>

#include <cstdint>

namespace knnmem::cpu {
namespace {

template <bool kDotProd>
struct VNeon {
  static constexpr int W = 4;
  static constexpr bool kMaskedStores = false;
  static constexpr bool kNativeBF16 = false;
  using F = float32x4_t;
  using I = int32x4_t;
  using M = uint32x4_t;

  static F zero() { return vdupq_n_f32(0.0f); }
  static F load(const float* p) { return vld1q_f32(p); }
  static F load_f16(const uint16_t* p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }
  static void store(float* p, F a) { vst1q_f32(p, a); }
  static F set1(float x) { return vdupq_n_f32(x); }
  static F fma(F a, F b, F c) { return vfmaq_f32(c, a, b); }
  static F mul(F a, F b) { return vmulq_f32(a, b); }
  static F add(F a, F b) { return vaddq_f32(a, b); }
  static F sub(F a, F b) { return vsubq_f32(a, b); }
  static F min(F a, F b) { return vminq_f32(a, b); }
  static F floor(F v, F lo) { return vbslq_f32(vcgtq_f32(v, lo), v, lo); }
  static M gt(F a, F b) { return vcgtq_f32(a, b); }
  static M from_bits(uint32_t bits) {
    const uint32_t lane_bit[4] = {1, 2, 4, 8};
    return vtstq_u32(vdupq_n_u32(bits), vld1q_u32(lane_bit));
  }
  static uint32_t bits(M m) {
    const uint32_t lane_bit[4] = {1, 2, 4, 8};
    return vaddvq_u32(vandq_u32(m, vld1q_u32(lane_bit)));
  }
  static M mask_and(M a, M b) { return vandq_u32(a, b); }
  static F select(M m, F a, F b) { return vbslq_f32(m, a, b); }
  static F mask_load(const float* p, M m) {
    float tmp[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    const uint32_t b = bits(m);
    for (int l = 0; l < 4; ++l) {
      if (b >> l & 1u) tmp[l] = p[l];
    }
    return vld1q_f32(tmp);
  }
  static void mask_store(float* p, M m, F a) {
    float tmp[4];
    vst1q_f32(tmp, a);
    const uint32_t b = bits(m);
    for (int l = 0; l < 4; ++l) {
      if (b >> l & 1u) p[l] = tmp[l];
    }
  }
  static I slots(int32_t first) {
    const int32_t lane[4] = {0, 1, 2, 3};
    return vaddq_s32(vdupq_n_s32(first), vld1q_s32(lane));
  }
  static void mask_store_slots(int32_t* p, M m, I a) {
    int32_t tmp[4];
    vst1q_s32(tmp, a);
    const uint32_t b = bits(m);
    for (int l = 0; l < 4; ++l) {
      if (b >> l & 1u) p[l] = tmp[l];
    }
  }
  static I load_slots(const int32_t* p) { return vld1q_s32(p); }
  static void store_slots(int32_t* p, I a) { vst1q_s32(p, a); }
  static I select_slots(M m, I a, I b) { return vbslq_s32(m, a, b); }
  static I izero() { return vdupq_n_s32(0); }
  static I load_words(const uint32_t* p) { return vreinterpretq_s32_u32(vld1q_u32(p)); }
  static I set1_word(uint32_t w) { return vreinterpretq_s32_u32(vdupq_n_u32(w)); }
  // Four byte products per lane, summed into the lane's int32. The query bytes
  // are 1 .. 127, so reading them as signed bytes changes nothing.
  static I dot_u8s8(I acc, I q, I k) {
    const int8x16_t qb = vreinterpretq_s8_s32(q);
    const int8x16_t kb = vreinterpretq_s8_s32(k);
    if constexpr (kDotProd) {
#if defined(__ARM_FEATURE_DOTPROD)
      return vdotq_s32(acc, qb, kb);
#else
      static_assert(!kDotProd, "build this unit with the dot-product extension");
      return acc;
#endif
    } else {
      const int32x4_t lo = vpaddlq_s16(vmull_s8(vget_low_s8(qb), vget_low_s8(kb)));
      const int32x4_t hi = vpaddlq_s16(vmull_high_s8(qb, kb));
      return vaddq_s32(acc, vpaddq_s32(lo, hi));
    }
  }
  static I isub(I a, I b) { return vsubq_s32(a, b); }
  static I shl6(I a) { return vshlq_n_s32(a, 6); }
  static F to_float(I a) { return vcvtq_f32_s32(a); }
  static F widen_even(const uint32_t* k) {
    return vreinterpretq_f32_u32(vshlq_n_u32(vld1q_u32(k), 16));
  }
  static F widen_odd(const uint32_t* k) {
    return vreinterpretq_f32_u32(vandq_u32(vld1q_u32(k), vdupq_n_u32(0xFFFF0000u)));
  }
};

}  // namespace
}  // namespace knnmem::cpu
