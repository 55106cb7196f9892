// The best few of many (score, slot) entries -- score descending, then slot
// ascending -- without comparison sorts, whose branches on a few hundred
// random scores cost more than scanning a small memory. Scores become
// integers of the same order; the want-th largest is found bit by bit, from
// the top, by counting the entries at or above a candidate value (branch-free
// loops the compiler vectorizes); the entries above it are taken, and of
// those equal to it the lowest slots. Used for the top-k of a query's bin
// winners (search.cpp). The counting loops run in the active CPU variant
// (cpu/select_impl.hpp), vectorized with its instruction set.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/kernels.hpp"

namespace knnmem::detail {

struct Candidate {
  float score;
  int32_t slot;
};

// Result order: a total order while slots differ.
inline bool better(const Candidate& a, const Candidate& b) {
  return a.score > b.score || (a.score == b.score && a.slot < b.slot);
}

// A score as an unsigned integer of the same order (-0 folded into +0, so
// that equal scores stay equal); 0 is left for empty entries, below every score.
inline uint32_t ordered_score(float score) {
  const float f = score + 0.0f;
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b ^ (static_cast<uint32_t>(static_cast<int32_t>(b) >> 31) | 0x80000000u);
}

// The score an ordered_score came from (+0 for a zero; not for 0 = empty).
inline float score_of_ordered(uint32_t key) {
  const uint32_t b = key & 0x80000000u ? key ^ 0x80000000u : ~key;
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}

class BestOf {
 public:
  // Takes n entries (slot < 0: empty, never chosen); the arrays must outlive
  // the calls below. Returns how many are not empty.
  int64_t set(const float* score, const int32_t* slot, int64_t n) {
    score_ = score;
    slot_ = slot;
    key_.resize(static_cast<std::size_t>(n));
    int64_t filled = 0;
    uint32_t lo = ~0u, hi = 0;
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t key = slot[i] >= 0 ? ordered_score(score[i]) : 0u;
      key_[static_cast<std::size_t>(i)] = key;
      filled += key != 0;
      hi = std::max(hi, key);
      lo = std::min(lo, key == 0 ? ~0u : key);
    }
    lo_ = lo;
    hi_ = hi;
    return filled;
  }

  // Indices of the best `want` (1 <= want <= filled) entries, in no order.
  const std::vector<int32_t>& choose(int64_t want) {
    const int64_t n = static_cast<int64_t>(key_.size());
    const uint32_t* key = key_.data();
    const uint32_t t =
        cpu::active_kernel().kth_key(key, n, want, lo_, hi_);  // the want-th largest key
    chosen_.clear();
    ties_.clear();
    for (int64_t i = 0; i < n; ++i) {
      if (key[i] > t) chosen_.push_back(static_cast<int32_t>(i));
      if (key[i] == t) ties_.push_back(static_cast<int32_t>(i));
    }
    const std::size_t need = static_cast<std::size_t>(want) - chosen_.size();
    if (ties_.size() > need) {
      std::nth_element(ties_.begin(), ties_.begin() + static_cast<std::ptrdiff_t>(need),
                       ties_.end(), [&](int32_t a, int32_t b) { return slot_[a] < slot_[b]; });
    }
    chosen_.insert(chosen_.end(), ties_.begin(), ties_.begin() + static_cast<std::ptrdiff_t>(need));
    return chosen_;
  }

  // The chosen entries into out, in result order: each goes to its rank, the
  // number of chosen entries better than it (a permutation: slots differ).
  void sorted(Candidate* out) {
    const std::size_t m = chosen_.size();
    if (m > kRankSortMax) {
      for (std::size_t j = 0; j < m; ++j) out[j] = {score_[chosen_[j]], slot_[chosen_[j]]};
      std::sort(out, out + m, better);
      return;
    }
    ck_.resize(m);
    cs_.resize(m);
    for (std::size_t j = 0; j < m; ++j) {
      ck_[j] = key_[static_cast<std::size_t>(chosen_[j])];
      cs_[j] = slot_[chosen_[j]];
    }
    rank_.resize(m);
    cpu::active_kernel().rank(ck_.data(), cs_.data(), static_cast<int64_t>(m), rank_.data());
    for (std::size_t j = 0; j < m; ++j) out[rank_[j]] = {score_[chosen_[j]], cs_[j]};
  }

 private:
  static constexpr std::size_t kRankSortMax = 64;  // above: a comparison sort (ranks cost m^2)
  const float* score_ = nullptr;
  const int32_t* slot_ = nullptr;
  std::vector<uint32_t> key_;
  uint32_t lo_ = 0, hi_ = 0;  // smallest and largest key of a filled entry
  std::vector<int32_t> chosen_, ties_;
  std::vector<uint32_t> ck_;
  std::vector<int32_t> cs_;
  std::vector<int32_t> rank_;
};

}  // namespace knnmem::detail
