// Search: a task per (memory, block of queries, range of slots) runs the
// active CPU kernel (fused scoring + strided-bin or exact top-k reduction, see
// cpu/kernels.hpp); ranges of one memory are merged bin by bin, then the exact
// top-k of the bin winners is selected and keys/values are gathered.
//
// Results do not depend on the number of threads or ranges: a bin keeps the
// highest score and, among equal scores, the lowest slot, which is what one
// ascending scan keeps too; the final order is (score desc, slot asc).
//
// The stages live in search_scan.cpp and search_results.cpp; what they share
// (the plan, the tuning constants) in search_impl.hpp.
#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "core/assert.hpp"
#include "core/search_impl.hpp"
#include "core/thread_pool.hpp"
#include "knnmem/knnmem.hpp"

namespace knnmem {
namespace search_impl {
namespace {

// Exact search of memory g for queries [q0, q1) in this thread.
void search_exact(const Plan& p, int64_t g, int64_t q0, int64_t q1) {
  Partial part;
  scan_part(p, prepare_queries(p, g, q0, q1), 0, scan_range(p.m->capacity, p.m->written[g]).end,
            true, part);
  const bool complete = finish(p, g, q0, q1, &part, 1, true, q0);
  KNNMEM_ASSERT(complete);
}

// Slot range `s` of `splits` over [0, end), cut at panel boundaries.
std::pair<int64_t, int64_t> split_range(int64_t end, int64_t s, int64_t splits) {
  auto cut = [&](int64_t i) {
    return std::min(end, (end * i / splits + kPanelSlots - 1) / kPanelSlots * kPanelSlots);
  };
  return {cut(s), cut(s + 1)};
}

// Scans and finishes every (memory, query chunk): scores, indices and mask of
// all results, and their slots.
void find_results(Plan& p) {
  const MemoryView& memory = *p.m;
  const int64_t num_queries = p.num_queries;
  const int64_t tasks = memory.grid * p.chunks;
  auto queries_of = [&](int64_t c) {
    const int64_t q0 = c * p.q_chunk;
    return std::pair<int64_t, int64_t>{q0, std::min(num_queries, q0 + p.q_chunk)};
  };
  if (p.splits == 1) {
    detail::parallel_for(static_cast<std::size_t>(tasks), [&](std::size_t i) {
      const int64_t g = static_cast<int64_t>(i) / p.chunks;
      const auto [q0, q1] = queries_of(static_cast<int64_t>(i) % p.chunks);
      Partial part;
      scan_part(p, prepare_queries(p, g, q0, q1), 0,
                scan_range(memory.capacity, memory.written[g]).end, false, part);
      if (!finish(p, g, q0, q1, &part, 1, false, q0)) search_exact(p, g, q0, q1);
    });
    return;
  }
  // Each chunk's queries are prepared once for the tasks of all its ranges.
  std::vector<PreparedQueries> prepared(static_cast<std::size_t>(tasks));
  detail::parallel_for(prepared.size(), [&](std::size_t t) {
    const int64_t g = static_cast<int64_t>(t) / p.chunks;
    const auto [q0, q1] = queries_of(static_cast<int64_t>(t) % p.chunks);
    prepared[t] = prepare_queries(p, g, q0, q1);
  });
  std::vector<Partial> parts(static_cast<std::size_t>(tasks * p.splits));
  // Exact top-k over split slot ranges: the ranges of a query chunk share a
  // lower bound on each query's k-th score (TopKBuffers::shared_bound).
  std::vector<uint32_t> bounds(static_cast<std::size_t>(tasks * p.q_chunk), 0u);
  detail::parallel_for(parts.size(), [&](std::size_t i) {
    const int64_t t = static_cast<int64_t>(i) / p.splits;
    const PreparedQueries& queries = prepared[static_cast<std::size_t>(t)];
    const int64_t end = scan_range(memory.capacity, memory.written[queries.g]).end;
    const auto [s0, s1] = split_range(end, static_cast<int64_t>(i) % p.splits, p.splits);
    scan_part(p, queries, s0, s1, false, parts[i], bounds.data() + t * p.q_chunk);
  });
  // Merged and finished in pieces of at most kFinishPiece queries, so a big
  // query chunk still finishes on every thread.
  const int64_t pieces = (p.q_chunk + kFinishPiece - 1) / kFinishPiece;
  detail::parallel_for(static_cast<std::size_t>(tasks * pieces), [&](std::size_t i) {
    const int64_t t = static_cast<int64_t>(i) / pieces;
    const int64_t g = t / p.chunks;
    const auto [q0, q1] = queries_of(t % p.chunks);
    const int64_t a = q0 + (static_cast<int64_t>(i) % pieces) * kFinishPiece;
    const int64_t b = std::min(q1, a + kFinishPiece);
    if (a >= b) return;
    if (!finish(p, g, a, b, parts.data() + t * p.splits, p.splits, false, q0)) {
      search_exact(p, g, a, b);
    }
  });
}

void search_snapshot(const MemoryView& memory, const float* queries, int64_t num_queries,
                     const SearchOptions& options, const SearchOutput& out) {
  const KeyFormat format = scored_format(memory, options);
  const int64_t num_bins = bins_for_search(options.k, options.recall_target, format);
  KNNMEM_ASSERT(memory.placement != nullptr && memory.placement->capacity() == memory.capacity);
  if (num_queries == 0 || memory.grid == 0) return;
  cpu::active_kernel();  // resolves KNNMEM_KERNEL here, in the caller's thread

  Plan p{&memory, &options, &out, queries, num_queries, num_bins, 0, 0, 1};
  // Bins hold a score and a slot per query, exact mode 2k candidates: fewer queries
  // per task for many bins or a big k, so a task's buffers stay within kTopKBudget
  // (num_bins <= kMaxBins and k <= capacity < 2^31: no product below overflows).
  KNNMEM_ASSERT(num_bins == 0 || (num_bins >= options.k && num_bins <= kMaxBins));
  const int64_t per_query = 8 * std::max({num_bins, 2 * options.k, int64_t{256}});
  const int64_t max_chunk =
      memory.key_layout == KeyLayout::kRows ? kMaxRowQueryChunk : kMaxQueryChunk;
  p.q_chunk = std::clamp<int64_t>(kTopKBudget / per_query, 1, max_chunk);
  p.chunks = (num_queries + p.q_chunk - 1) / p.q_chunk;
  // Too few (memory, query chunk) tasks to balance over the threads: cut each
  // memory's slots into ranges too (results do not depend on the cut).
  const int64_t tasks = memory.grid * p.chunks;
  const int64_t want = 8 * static_cast<int64_t>(get_num_threads());
  if (tasks < want) {
    p.splits = std::clamp<int64_t>((want + tasks - 1) / tasks, 1,
                                   std::max<int64_t>(1, memory.capacity / kMinSplitSlots));
  }

  std::vector<int32_t> hit_slots;
  const int64_t key_bytes =
      padded_capacity(memory.capacity) * 4 * key_words(format, memory.key_dim);
  if ((out.keys || out.values) && memory.key_layout == KeyLayout::kPanels &&
      key_bytes > kGatherInOrderBytes) {
    hit_slots.resize(static_cast<std::size_t>(memory.grid * num_queries * options.k));
    p.hit_slots = hit_slots.data();
  }
  // Results much bigger than the last-level cache are streamed to memory.
  const int64_t result_bytes = memory.grid * num_queries * options.k *
                               ((out.keys ? memory.key_dim * row_bytes(out.key_format) : 0) +
                                (out.values ? memory.value_dim * row_bytes(out.value_format) : 0));
  p.stream = result_bytes > kStreamResultBytes;
  find_results(p);
  if (p.hit_slots) gather(p);
}

}  // namespace
}  // namespace search_impl

void search(const MemoryView& memory, const float* queries, int64_t num_queries,
            const SearchOptions& options, const SearchOutput& out) {
  check_search_options(options.k, options.recall_target, memory.capacity);
  // A caller-owned ring may be changed by another thread during the call. Its
  // counters are read once, here: every slot range, mask and stream position
  // below comes from this snapshot, so a concurrent add or clear can make the
  // result stale or mix rows of two steps, but never send a read out of bounds.
  // The snapshot is indexed by the view's memory g (its cell's counter).
  std::vector<int64_t> written(static_cast<std::size_t>(memory.grid));
  for (int64_t g = 0; g < memory.grid; ++g) written[g] = memory.written[memory.cell(g)];
  for (int64_t g = 0; g < memory.grid; ++g) {
    if (written[g] < 0) {
      throw InvalidArgument("written: expected counts >= 0, got " + std::to_string(written[g]) +
                            " at index [" + std::to_string(g) + "]");
    }
  }
  MemoryView snapshot = memory;
  snapshot.written = written.data();
  search_impl::search_snapshot(snapshot, queries, num_queries, options, out);
}

}  // namespace knnmem
