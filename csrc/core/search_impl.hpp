// The search's internals shared by its stages (csrc/core/search*.cpp), not
// part of the public API: the tuning constants, the plan of a search, and the
// reduction state of a task.
//
//   search.cpp          the entry point: arguments, the counters' snapshot,
//                       the plan, and the tasks of the scan and finish steps
//   search_scan.cpp     a task's scan: queries prepared for the metric and key
//                       format, row-layout keys packed into panels, the kernel
//   search_results.cpp  a task's finish: partial states merged, the top-k of
//                       the bin winners (or the exact candidates) selected,
//                       and results written: scores, positions, keys, values
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "core/block_cache.hpp"
#include "core/select.hpp"
#include "cpu/kernels.hpp"
#include "knnmem/knnmem.hpp"

namespace knnmem::search_impl {

// --- Tuning constants (measured on the workloads in bench/run.py) ----------
// Queries per task, a multiple of the tile heights. Every task streams its
// memory's keys once, so bigger chunks read them fewer times; 192 queries of
// bins (223 KB at k=32, r=0.9) still sit in L2 next to a block of keys.
constexpr int64_t kMaxQueryChunk = 192;
// Queries merged and finished per task of the last step.
constexpr int64_t kFinishPiece = 48;
constexpr int64_t kPackSlots = 512;          // slots packed at a time for row-layout keys
constexpr int64_t kMinSplitSlots = 8192;     // smallest range of slots worth its own task
constexpr int64_t kTopKBudget = 64ll << 20;  // bytes of a task's bin or top-k buffers
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Row-layout keys are packed into panels by every task that scans them, so a
// task takes many more queries there: the packing is paid once per slot range.
constexpr int64_t kMaxRowQueryChunk = 528;
// Panel memories with more bytes of keys than this copy their results' keys
// and values once all are found (Gather), smaller ones as each piece of queries
// is finished, while their panels are still cached; both in panel order.
constexpr int64_t kGatherInOrderBytes = 4ll << 20;
// Keys and values of results bigger than this bypass the caches (copy_floats).
constexpr int64_t kStreamResultBytes = 8ll << 20;
// Value rows are asked for this many hits before they are copied.
constexpr int64_t kPrefetchHits = 8;
// A memory's whole value block is prefetched during its selection where there
// is at least one hit per kDenseHitRows live rows and the block is at most
// kMaxPrefetchBytes (so that it is still cached when the rows are copied).
constexpr int64_t kDenseHitRows = 4;
constexpr int64_t kMaxPrefetchBytes = 4ll << 20;

using detail::better;
using detail::Candidate;

// Which slots a memory's search visits. Rows fill placement blocks in order,
// so a memory that has not wrapped has written whole blocks [0, masked_begin)
// and part of the block [masked_begin, end): there a slot is live only if the
// stream offset it holds is < written.
struct ScanRange {
  int64_t end = 0;
  int64_t masked_begin = 0;
};

inline ScanRange scan_range(int64_t capacity, int64_t written) {
  if (written >= capacity) return {capacity, capacity};
  const int64_t block = Placement::kPlacementBlock;
  const int64_t full = (written / block) * block;
  const int64_t end = written == full ? full : std::min(capacity, full + block);
  return {end, full};
}

// Reduction state of one task: bins or exact top-k buffers, per query. begin()
// sets it up for the task's queries, the kernel adds scores to it, and the
// reductions of search_results.cpp (BinReduction, TopKReduction) finish it.
// Its buffers come from the scratch cache (core/block_cache.hpp): a search's
// bins are the same size every step, and fresh ones fault their pages in.
struct Partial {
  float* best = nullptr;    // bins: [nq][num_bins]
  int32_t* slot = nullptr;  // bins: [nq][num_bins]
  cpu::TopKBuffers topk;    // exact: buffers of 2k or more candidates per query
  detail::ScratchBlock memory;

  void begin(int64_t nq, int64_t num_bins, int64_t k, uint32_t* shared_bound = nullptr) {
    if (num_bins > 0) {
      const std::size_t n = static_cast<std::size_t>(nq * num_bins);
      char* at = static_cast<char*>(memory.reserve(n * (sizeof(float) + sizeof(int32_t))));
      best = reinterpret_cast<float*>(at);
      slot = reinterpret_cast<int32_t*>(at + n * sizeof(float));
      std::fill_n(best, n, kNegInf);
      std::fill_n(slot, n, -1);
      return;
    }
    const int64_t cap = std::max<int64_t>(2 * k, 256);
    const std::size_t n = static_cast<std::size_t>(nq * cap), q = static_cast<std::size_t>(nq);
    char* at = static_cast<char*>(memory.reserve(n * (sizeof(float) + sizeof(int32_t)) +
                                                 q * (sizeof(int64_t) + sizeof(float))));
    topk.sizes = reinterpret_cast<int64_t*>(at);  // 8-byte fields first: aligned
    topk.thresholds = reinterpret_cast<float*>(at + q * sizeof(int64_t));
    topk.scores = topk.thresholds + q;
    topk.slots = reinterpret_cast<int32_t*>(topk.scores + n);
    std::fill_n(topk.sizes, q, int64_t{0});
    std::fill_n(topk.thresholds, q, kNegInf);
    topk.capacity = cap;
    topk.k = k;
    topk.shared_bound = shared_bound;
  }
};

// Plan::m is the search's snapshot: its `written` holds memory g's counter at
// index g; the memory's storage is at index m->cell(g) (a sub-grid).
struct Plan {
  const MemoryView* m;
  const SearchOptions* opt;
  const SearchOutput* out;
  const float* queries;
  int64_t num_queries;  // per memory
  int64_t num_bins;     // 0 = exact
  int64_t q_chunk;
  int64_t chunks;                // query chunks per memory
  int64_t splits;                // slot ranges per memory
  bool stream = false;           // results bypass the caches (copy_floats)
  int32_t* hit_slots = nullptr;  // [G][Q][k] slots of the results, when keys or values are wanted
};

inline int64_t row_bytes(RowFormat format) { return format == RowFormat::kFloat32 ? 4 : 2; }

// Bins for a memory holding `live` rows; 0 = exact top-k.
// The format keys are scored in: a panel memory's own, or the one asked for
// row-layout keys.
inline KeyFormat scored_format(const MemoryView& m, const SearchOptions& options) {
  return m.key_layout == KeyLayout::kPanels ? m.key_format : options.score_format;
}

inline int64_t bins_for(const Plan& p, int64_t live, bool exact) {
  return exact || p.num_bins == 0 || p.num_bins >= live ? 0 : p.num_bins;
}

// Queries [q0, q1) of memory g prepared for the metric and the scored key
// format: rows (unit length for cosine, zero-padded to q_stride), |q|^2 for
// l2, and for bfloat16 or int8 keys their words and (int8) scales -- what
// cpu::ScanArgs takes (search_scan.cpp).
struct PreparedQueries {
  int64_t g = 0, q0 = 0, q1 = 0;
  int64_t q_stride = 0;
  std::vector<float> rows, sq, scale;
  std::vector<uint32_t> words;
};
PreparedQueries prepare_queries(const Plan& p, int64_t g, int64_t q0, int64_t q1);

// Scans slots [s_begin, s_end) of the prepared queries' memory into `part`
// (search_scan.cpp).
void scan_part(const Plan& p, const PreparedQueries& queries, int64_t s_begin, int64_t s_end,
               bool exact, Partial& part, uint32_t* shared_bound = nullptr);

// Merges the partial states of memory g's slot ranges and writes the results
// of queries [q0, q1) (search_results.cpp; see there).
bool finish(const Plan& p, int64_t g, int64_t q0, int64_t q1, Partial* parts, int64_t nparts,
            bool exact, int64_t first);

// Copies the keys and values of every hit of memories too big for the caches,
// once all results are known (search_results.cpp).
void gather(const Plan& p);

}  // namespace knnmem::search_impl
