// The two loops of core/select.hpp's BestOf that count, compiled once per
// variant (scan_<name>.cpp) so that they vectorize with its instruction set:
// with AVX-512 a pass over 160 bin winners is 10 compares, with the x86-64
// baseline 40. Plain loops over arrays (see kernels.hpp for the rules these
// units follow); results do not depend on the variant.
#pragma once

#include <cstdint>

namespace knnmem::cpu {
namespace {

// The largest t with at least `want` of key[0..n) >= t, given that every
// key that counts lies in [lo, hi] (keys below lo, such as the 0 of an empty
// entry, never reach t): t starts with the leading bits lo and hi share and
// takes the others from the top, one counting pass each.
uint32_t select_kth_key(const uint32_t* key, int64_t n, int64_t want, uint32_t lo, uint32_t hi) {
  const uint32_t differ = lo ^ hi;
  const int top = differ == 0 ? -1 : 31 - __builtin_clz(differ);
  uint32_t t = top < 0 ? hi : hi & ~((2u << top) - 1u);  // (2u << 31 wraps to 0: t = 0)
  for (int bit = top; bit >= 0; --bit) {
    const uint32_t c = t | (1u << bit);
    int32_t at_or_above = 0;
    for (int64_t i = 0; i < n; ++i) at_or_above += key[i] >= c;
    if (at_or_above >= want) t = c;
  }
  return t;
}

// rank[j] = how many of the m entries come before entry j: a higher key, or
// an equal key and a lower slot. Distinct slots make it a permutation.
void select_rank(const uint32_t* key, const int32_t* slot, int64_t m, int32_t* rank) {
  for (int64_t j = 0; j < m; ++j) {
    int32_t r = 0;
    for (int64_t i = 0; i < m; ++i) {
      r += static_cast<int32_t>((key[i] > key[j]) | ((key[i] == key[j]) & (slot[i] < slot[j])));
    }
    rank[j] = r;
  }
}

}  // namespace
}  // namespace knnmem::cpu
