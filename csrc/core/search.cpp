// Search: fused scoring + strided-bin partial reduction, then exact top-k of
// the bin winners and the gather of keys and values.
//
// Work is split into tasks of (memory, block of queries). A task walks the
// memory's live slots in blocks of kKeyBlock, scores the block against its
// queries into a small tile that stays in L1, and folds the tile into its
// reducer: per-bin running max (approximate) or a thresholded candidate
// buffer (exact). No score matrix over all slots is ever built.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "core/assert.hpp"
#include "core/thread_pool.hpp"
#include "cpu/kernels.hpp"
#include "knnmem/knnmem.hpp"

namespace knnmem {
namespace {

constexpr int64_t kQueryChunk = 32;  // queries per task
constexpr int64_t kKeyBlock = 128;   // slots per scored tile
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Candidate {
  float score;
  int32_t slot;
};

// Best first; equal scores by slot so the order is total and deterministic.
inline bool better(const Candidate& a, const Candidate& b) {
  return a.score > b.score || (a.score == b.score && a.slot < b.slot);
}

// Keeps the best `k` of what it is offered, in a buffer that is compacted
// with nth_element whenever it fills up.
class TopK {
 public:
  explicit TopK(int64_t k) : k_(k), limit_(std::max<int64_t>(2 * k, 256)) {
    buf_.reserve(static_cast<std::size_t>(limit_));
  }
  void offer(float score, int32_t slot) {
    if (!(score > threshold_)) return;
    buf_.push_back({score, slot});
    if (static_cast<int64_t>(buf_.size()) == limit_) compact();
  }
  std::vector<Candidate>& candidates() { return buf_; }

 private:
  void compact() {
    std::nth_element(buf_.begin(), buf_.begin() + (k_ - 1), buf_.end(), better);
    buf_.resize(static_cast<std::size_t>(k_));
    threshold_ = buf_[static_cast<std::size_t>(k_ - 1)].score;
  }
  int64_t k_, limit_;
  float threshold_ = kNegInf;
  std::vector<Candidate> buf_;
};

// Which slots a memory's search must visit. Rows fill placement blocks in
// order, so a memory that has not wrapped has written whole blocks
// [0, masked_begin) and part of the block [masked_begin, end): there a slot
// is live only if the stream offset it holds is < written.
struct ScanRange {
  int64_t end = 0;
  int64_t masked_begin = 0;
};

ScanRange scan_range(int64_t capacity, int64_t written) {
  if (written >= capacity) return {capacity, capacity};
  const int64_t block = Placement::kPlacementBlock;
  const int64_t full = (written / block) * block;
  const int64_t end = written == full ? full : std::min(capacity, full + block);
  return {end, full};
}

struct Task {
  const MemoryView* m;
  const SearchOptions* opt;
  const SearchOutput* out;
  int64_t num_queries;  // per memory
  int64_t num_bins;     // 0 = exact
};

void write_empty(const Task& t, int64_t g, int64_t q0, int64_t q1) {
  const int64_t k = t.opt->k;
  for (int64_t q = q0; q < q1; ++q) {
    const int64_t o = (g * t.num_queries + q) * k;
    std::fill(t.out->scores + o, t.out->scores + o + k, kNegInf);
    std::fill(t.out->indices + o, t.out->indices + o + k, int64_t{-1});
    std::fill(t.out->mask + o, t.out->mask + o + k, false);
    if (t.out->keys) std::fill_n(t.out->keys + o * t.m->key_dim, k * t.m->key_dim, 0.0f);
    if (t.out->values) std::fill_n(t.out->values + o * t.m->value_dim, k * t.m->value_dim, 0.0f);
  }
}

// Sorts the best k of `cands` to the front and writes query q's results.
void write_result(const Task& t, int64_t g, int64_t q, int64_t written,
                  std::vector<Candidate>& cands) {
  const MemoryView& m = *t.m;
  const int64_t k = t.opt->k;
  const int64_t found = std::min<int64_t>(k, static_cast<int64_t>(cands.size()));
  std::partial_sort(cands.begin(), cands.begin() + found, cands.end(), better);
  const int64_t o = (g * t.num_queries + q) * k;
  for (int64_t j = 0; j < k; ++j) {
    const bool hit = j < found;
    const int64_t slot = hit ? cands[static_cast<std::size_t>(j)].slot : -1;
    t.out->scores[o + j] = hit ? cands[static_cast<std::size_t>(j)].score : kNegInf;
    t.out->indices[o + j] = hit ? position_of_slot(*m.placement, written, slot) : -1;
    t.out->mask[o + j] = hit;
    if (t.out->keys) {
      float* dst = t.out->keys + (o + j) * m.key_dim;
      if (hit) {
        std::memcpy(dst, m.keys + (g * m.capacity + slot) * m.key_stride,
                    sizeof(float) * m.key_dim);
      } else {
        std::fill_n(dst, m.key_dim, 0.0f);
      }
    }
    if (t.out->values) {
      float* dst = t.out->values + (o + j) * m.value_dim;
      if (hit) {
        std::memcpy(dst, m.values + (g * m.capacity + slot) * m.value_stride,
                    sizeof(float) * m.value_dim);
      } else {
        std::fill_n(dst, m.value_dim, 0.0f);
      }
    }
  }
}

void search_chunk(const Task& t, const float* queries, int64_t g, int64_t q0, int64_t q1) {
  const MemoryView& m = *t.m;
  const int64_t written = m.written[g];
  const int64_t live = std::min(written, m.capacity);
  if (live == 0) {
    write_empty(t, g, q0, q1);
    return;
  }
  const int64_t nq = q1 - q0;
  const int64_t dim = m.key_dim;
  const int64_t k = t.opt->k;
  const Metric metric = t.opt->metric;
  const bool exact = t.num_bins == 0 || t.num_bins >= live;
  const int64_t L = t.num_bins;

  // Queries, transformed for the metric: cosine scores against unit queries,
  // l2 needs |q|^2.
  std::vector<float> qbuf(static_cast<std::size_t>(nq * dim));
  std::vector<float> q_sq(static_cast<std::size_t>(nq), 0.0f);
  std::memcpy(qbuf.data(), queries + (g * t.num_queries + q0) * dim, sizeof(float) * nq * dim);
  if (metric != Metric::kInnerProduct) {
    for (int64_t q = 0; q < nq; ++q) {
      float* row = qbuf.data() + q * dim;
      q_sq[q] = cpu::squared_norm(row, dim);
      if (metric == Metric::kCosine && q_sq[q] > 0.0f) {
        const float inv = 1.0f / std::sqrt(q_sq[q]);
        for (int64_t i = 0; i < dim; ++i) row[i] *= inv;
      }
    }
  }

  std::vector<TopK> topk;
  std::vector<float> bin_best;
  std::vector<int32_t> bin_slot;
  if (exact) {
    topk.reserve(static_cast<std::size_t>(nq));
    for (int64_t q = 0; q < nq; ++q) topk.emplace_back(k);
  } else {
    bin_best.assign(static_cast<std::size_t>(nq * L), kNegInf);
    bin_slot.assign(static_cast<std::size_t>(nq * L), -1);
  }

  const ScanRange range = scan_range(m.capacity, written);
  const int32_t* offset_of = m.placement->offset_of();
  const float* keys = m.keys + g * m.capacity * m.key_stride;
  const float* stored_sq = m.sq_norms ? m.sq_norms + g * m.capacity : nullptr;
  std::vector<float> tile(static_cast<std::size_t>(nq * kKeyBlock));
  float key_sq[kKeyBlock];
  float key_scale[kKeyBlock];

  for (int64_t s0 = 0; s0 < range.end; s0 += kKeyBlock) {
    const int64_t nk = std::min(kKeyBlock, range.end - s0);
    cpu::dot_tile(qbuf.data(), nq, dim, keys + s0 * m.key_stride, nk, m.key_stride, dim,
                  tile.data(), kKeyBlock);

    if (metric != Metric::kInnerProduct) {
      for (int64_t j = 0; j < nk; ++j) {
        key_sq[j] =
            stored_sq ? stored_sq[s0 + j] : cpu::squared_norm(keys + (s0 + j) * m.key_stride, dim);
      }
    }
    if (metric == Metric::kCosine) {
      for (int64_t j = 0; j < nk; ++j) {
        key_scale[j] = key_sq[j] > 0.0f ? 1.0f / std::sqrt(key_sq[j]) : 0.0f;
      }
      for (int64_t q = 0; q < nq; ++q) {
        float* row = tile.data() + q * kKeyBlock;
        for (int64_t j = 0; j < nk; ++j) row[j] *= key_scale[j];
      }
    } else if (metric == Metric::kL2) {
      for (int64_t q = 0; q < nq; ++q) {
        float* row = tile.data() + q * kKeyBlock;
        for (int64_t j = 0; j < nk; ++j) {
          row[j] = -std::max(0.0f, (q_sq[q] + key_sq[j]) - 2.0f * row[j]);
        }
      }
    }
    // Slots of the partly written block that hold no live row.
    for (int64_t j = std::max<int64_t>(0, range.masked_begin - s0); j < nk; ++j) {
      if (offset_of[s0 + j] >= written) {
        for (int64_t q = 0; q < nq; ++q) tile[q * kKeyBlock + j] = kNegInf;
      }
    }

    if (exact) {
      for (int64_t q = 0; q < nq; ++q) {
        const float* row = tile.data() + q * kKeyBlock;
        for (int64_t j = 0; j < nk; ++j) topk[q].offer(row[j], static_cast<int32_t>(s0 + j));
      }
    } else {
      // Strided bins: slot s goes to bin s mod L, so a tile is a few runs of
      // consecutive bins.
      for (int64_t q = 0; q < nq; ++q) {
        const float* row = tile.data() + q * kKeyBlock;
        float* best = bin_best.data() + q * L;
        int32_t* slot = bin_slot.data() + q * L;
        int64_t j = 0;
        int64_t b = s0 % L;
        while (j < nk) {
          const int64_t run = std::min(nk - j, L - b);
          for (int64_t i = 0; i < run; ++i) {
            const float v = row[j + i];
            const bool take = v > best[b + i];
            best[b + i] = take ? v : best[b + i];
            slot[b + i] = take ? static_cast<int32_t>(s0 + j + i) : slot[b + i];
          }
          j += run;
          b = 0;
        }
      }
    }
  }

  std::vector<Candidate> cands;
  for (int64_t q = 0; q < nq; ++q) {
    if (exact) {
      write_result(t, g, q0 + q, written, topk[q].candidates());
      continue;
    }
    cands.clear();
    for (int64_t b = 0; b < L; ++b) {
      const int32_t s = bin_slot[q * L + b];
      if (s >= 0) cands.push_back({bin_best[q * L + b], s});
    }
    write_result(t, g, q0 + q, written, cands);
  }
}

}  // namespace

void search(const MemoryView& memory, const float* queries, int64_t num_queries,
            const SearchOptions& options, const SearchOutput& out) {
  if (options.k < 1 || options.k > memory.capacity) {
    throw InvalidArgument("k: expected an integer in [1, capacity=" +
                          std::to_string(memory.capacity) + "], got " + std::to_string(options.k));
  }
  const int64_t num_bins = bins_for_recall(options.k, options.recall_target);
  KNNMEM_ASSERT(memory.placement != nullptr && memory.placement->capacity() == memory.capacity);
  KNNMEM_ASSERT(out.scores && out.indices && out.mask);
  if (num_queries == 0 || memory.grid == 0) return;

  const Task task{&memory, &options, &out, num_queries, num_bins};
  const int64_t chunks = (num_queries + kQueryChunk - 1) / kQueryChunk;
  detail::parallel_for(static_cast<std::size_t>(memory.grid * chunks), [&](std::size_t i) {
    const int64_t g = static_cast<int64_t>(i) / chunks;
    const int64_t c = static_cast<int64_t>(i) % chunks;
    const int64_t q0 = c * kQueryChunk;
    search_chunk(task, queries, g, q0, std::min(num_queries, q0 + kQueryChunk));
  });
}

}  // namespace knnmem
