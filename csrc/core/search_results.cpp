// A task's finish: the partial states of a memory's slot ranges merged, the
// top-k of each query selected (from the bin winners, or exactly), and the
// results written: scores, stream positions and mask, then keys and values,
// copied panel by panel.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "core/assert.hpp"
#include "core/positions.hpp"
#include "core/search_impl.hpp"
#include "core/store_key.hpp"
#include "core/thread_pool.hpp"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace knnmem::search_impl {
namespace {

// The stored key of a slot of memory g as float32 (bfloat16/float16 keys
// widened, int8 scaled).
const float* key_row(const MemoryView& m, int64_t g, int64_t slot, float* scratch) {
  const int64_t c = m.cell(g);
  if (m.key_layout == KeyLayout::kRows) {
    return static_cast<const float*>(m.keys) + (c * m.capacity + slot) * m.key_stride;
  }
  const int64_t base = c * padded_capacity(m.capacity) + slot / kPanelSlots * kPanelSlots;
  const int64_t lane = slot % kPanelSlots;
  if (m.key_format == KeyFormat::kFloat32) {
    const float* panel = static_cast<const float*>(m.keys) + base * m.key_dim;
    for (int64_t i = 0; i < m.key_dim; ++i) scratch[i] = panel[i * kPanelSlots + lane];
    return scratch;
  }
  if (m.key_format == KeyFormat::kFloat16) {
    const uint16_t* lane =
        reinterpret_cast<const uint16_t*>(static_cast<const uint32_t*>(m.keys) +
                                          base * key_words(KeyFormat::kFloat16, m.key_dim)) +
        slot % kPanelSlots;
    for (int64_t i = 0; i < m.key_dim; ++i) scratch[i] = detail::from_f16(lane[i * kPanelSlots]);
    return scratch;
  }
  if (m.key_format == KeyFormat::kInt8) {
    const uint32_t* lane = static_cast<const uint32_t*>(m.keys) +
                           base * key_words(KeyFormat::kInt8, m.key_dim) + slot % kPanelSlots;
    const float scale = m.key_scale[c * padded_capacity(m.capacity) + slot];
    for (int64_t i = 0; i < m.key_dim; ++i) {
      scratch[i] = static_cast<float>(detail::int8_dim(lane, kPanelSlots, i)) * scale;
    }
    return scratch;
  }
  const int64_t pairs = (m.key_dim + 1) / 2;
  const uint32_t* panel = static_cast<const uint32_t*>(m.keys) + base * pairs + lane;
  for (int64_t i = 0; i < m.key_dim; ++i) {
    scratch[i] = detail::from_bf16(detail::bf16_dim(panel, kPanelSlots, i));
  }
  return scratch;
}

// Copies n floats. With `stream` (results far bigger than the caches), rows
// at 16-byte aligned addresses are written around the caches: they are not
// read back soon, and a cached store would first fetch every line from memory.
void copy_floats(float* dst, const float* src, int64_t n, bool stream) {
#if defined(__SSE2__)
  if (stream && reinterpret_cast<uintptr_t>(dst) % 16 == 0 && n % 4 == 0) {
    for (int64_t i = 0; i < n; i += 4) _mm_stream_ps(dst + i, _mm_loadu_ps(src + i));
    return;
  }
#endif
  std::memcpy(dst, src, sizeof(float) * static_cast<std::size_t>(n));
}

// Where result row r of the keys (or values) starts, and in which format.
struct RowOut {
  char* base = nullptr;
  int64_t stride = 0;  // bytes between rows
  int64_t dim = 0;
  RowFormat format = RowFormat::kFloat32;

  RowOut(void* rows, int64_t row_stride, int64_t d, RowFormat f)
      : base(static_cast<char*>(rows)),
        stride((row_stride > 0 ? row_stride : d) * row_bytes(f)),
        dim(d),
        format(f) {}
  explicit operator bool() const { return base != nullptr; }
  void* at(int64_t r) const { return base + r * stride; }

  // Writes a float32 row as result row r, rounded to the format (nearest even).
  void put(int64_t r, const float* src, bool stream) const;
  void zero(int64_t r) const {
    std::memset(at(r), 0, static_cast<std::size_t>(dim * row_bytes(format)));
  }
};

RowOut key_rows(const Plan& p) {
  return RowOut(p.out->keys, p.out->key_row_stride, p.m->key_dim, p.out->key_format);
}
RowOut value_rows(const Plan& p) {
  return RowOut(p.out->values, p.out->value_row_stride, p.m->value_dim, p.out->value_format);
}

void RowOut::put(int64_t r, const float* src, bool stream) const {
  switch (format) {
    case RowFormat::kFloat32:
      copy_floats(static_cast<float*>(at(r)), src, dim, stream);
      return;
    case RowFormat::kBFloat16: {
      uint16_t* dst = static_cast<uint16_t*>(at(r));
      for (int64_t i = 0; i < dim; ++i) dst[i] = detail::to_bf16(src[i]);
      return;
    }
    case RowFormat::kFloat16: {
      uint16_t* dst = static_cast<uint16_t*>(at(r));
      for (int64_t i = 0; i < dim; ++i) dst[i] = detail::to_f16(src[i]);
      return;
    }
  }
}

// Orders this thread's streaming stores before whatever publishes its results.
void end_streams(const Plan& p) {
#if defined(__SSE2__)
  if (p.stream) _mm_sfence();
#endif
  (void)p;
}

#if defined(__SSE2__)
// The float32, bfloat16 or int8 key of a slot of memory g (panels, dimensions
// a multiple of 4) to dst, four dimensions at a time through store(at, v).
template <class Store>
void write_panel_key(const MemoryView& m, int64_t g, int64_t slot, float* dst, Store store) {
  const int64_t at = m.cell(g) * padded_capacity(m.capacity) + slot;  // the slot's entry
  const int64_t base = (at - slot % kPanelSlots) * key_words(m.key_format, m.key_dim);
  const int64_t S = kPanelSlots;
  if (m.key_format == KeyFormat::kFloat32) {
    const float* lane = static_cast<const float*>(m.keys) + base + slot % S;
    for (int64_t i = 0; i < m.key_dim; i += 4) {
      store(dst + i,
            _mm_setr_ps(lane[i * S], lane[(i + 1) * S], lane[(i + 2) * S], lane[(i + 3) * S]));
    }
    return;
  }
  const uint32_t* lane = static_cast<const uint32_t*>(m.keys) + base + slot % S;
  if (m.key_format == KeyFormat::kBFloat16) {  // word w: dims 2w (low half), 2w + 1
    const int32_t high = static_cast<int32_t>(0xFFFF0000u);
    for (int64_t i = 0; i < m.key_dim; i += 4) {
      const int32_t w0 = static_cast<int32_t>(lane[i / 2 * S]);
      const int32_t w1 = static_cast<int32_t>(lane[(i / 2 + 1) * S]);
      store(dst + i, _mm_castsi128_ps(_mm_setr_epi32(
                         static_cast<int32_t>(static_cast<uint32_t>(w0) << 16), w0 & high,
                         static_cast<int32_t>(static_cast<uint32_t>(w1) << 16), w1 & high)));
    }
    return;
  }
  const __m128 scale = _mm_set1_ps(m.key_scale[at]);  // int8: word w holds dims 4w .. 4w + 3
  for (int64_t i = 0; i < m.key_dim; i += 4) {
    __m128i x = _mm_cvtsi32_si128(static_cast<int32_t>(lane[i / 4 * S]));
    x = _mm_unpacklo_epi8(x, x);  // byte b of the word to the top of 32-bit lane b
    x = _mm_srai_epi32(_mm_unpacklo_epi16(x, x), 24);
    store(dst + i, _mm_mul_ps(_mm_cvtepi32_ps(x), scale));
  }
}
#endif

// A key in panels straight to its float32 result row, four dimensions per
// store (float32: one from each of four panel rows; bfloat16: two words of
// pairs; int8: one word, widened and scaled as key_row does), without a row in
// between; streamed around the caches where the plan says so and the row is
// 16-byte aligned. False (nothing written) where that does not apply (float16,
// rows, other row formats, dimensions not a multiple of 4).
bool panel_key_row(const Plan& p, int64_t g, int64_t slot, void* row) {
#if defined(__SSE2__)
  const MemoryView& m = *p.m;
  float* dst = static_cast<float*>(row);
  if (m.key_layout != KeyLayout::kPanels || m.key_format == KeyFormat::kFloat16 ||
      p.out->key_format != RowFormat::kFloat32 || m.key_dim % 4 != 0) {
    return false;
  }
  if (p.stream && reinterpret_cast<uintptr_t>(dst) % 16 == 0) {
    write_panel_key(m, g, slot, dst, [](float* at, __m128 v) { _mm_stream_ps(at, v); });
  } else {
    write_panel_key(m, g, slot, dst, [](float* at, __m128 v) { _mm_storeu_ps(at, v); });
  }
  return true;
#else
  (void)p, (void)g, (void)slot, (void)row;
  return false;
#endif
}

// Asks for the value row of a slot a few hits before it is copied: values are
// not touched by the scan, so they come from memory (kPrefetchHits ahead).
void prefetch_value(const Plan& p, int64_t g, int64_t slot) {
  const MemoryView& m = *p.m;
  if (!p.out->values) return;
  const char* row =
      reinterpret_cast<const char*>(m.values + (m.cell(g) * m.capacity + slot) * m.value_stride);
  for (int64_t b = 0; b < m.value_dim * 4; b += 64) __builtin_prefetch(row + b);
}

// Brings a memory's value rows towards the caches while its queries' results
// are being selected, a slice per query, so that the copy after the selection
// reads them from the caches rather than from memory (the scan never touches
// values; waiting for them row by row took ~15% of a search of many small
// memories, M2). Only where the hits are dense enough -- at least one per
// kDenseHitRows live rows -- for the whole block to be worth reading, and the
// block small enough (kMaxPrefetchBytes) to still be cached when it is copied.
class ValuePrefetch {
 public:
  ValuePrefetch(const Plan& p, int64_t g, int64_t num_queries, int64_t rows) {
    const MemoryView& m = *p.m;
    const int64_t bytes = rows * m.value_stride * 4;
    if (!p.out->values || p.hit_slots || num_queries * p.opt->k * kDenseHitRows < rows ||
        bytes > kMaxPrefetchBytes) {
      return;
    }
    begin_ = reinterpret_cast<const char*>(m.values + m.cell(g) * m.capacity * m.value_stride);
    bytes_ = bytes;
    per_query_ = (bytes / num_queries + 63) / 64 * 64;
  }

  // The slice of query q (of the num_queries of the constructor).
  void step(int64_t q) const {
    const int64_t end = std::min(bytes_, (q + 1) * per_query_);
    for (int64_t b = q * per_query_; b < end; b += 64) __builtin_prefetch(begin_ + b, 0, 2);
  }

 private:
  const char* begin_ = nullptr;
  int64_t bytes_ = 0;
  int64_t per_query_ = 0;
};

// The result's key and value rows (either may be absent), set up once per batch of hits.
struct ResultRows {
  RowOut keys, values;
  explicit ResultRows(const Plan& p) : keys(key_rows(p)), values(value_rows(p)) {}
};

// The stored key and the value of a hit into result row o.
void copy_hit(const Plan& p, const ResultRows& rows, int64_t g, int64_t slot, int64_t o,
              float* scratch) {
  const MemoryView& m = *p.m;
  if (rows.keys && !panel_key_row(p, g, slot, rows.keys.at(o))) {
    rows.keys.put(o, key_row(m, g, slot, scratch), p.stream);
  }
  if (rows.values) {
    rows.values.put(o, m.values + (m.cell(g) * m.capacity + slot) * m.value_stride, p.stream);
  }
}

// Writes query q's scores, indices and mask from its `found` best candidates
// (in result order) and the slots of its results (-1: none) to `slots`; the
// keys and values of misses are zeroed here, those of hits copied later (by
// finish, or by Gather for big memories).
void write_result(const Plan& p, int64_t g, int64_t q, const Candidate* best, int64_t found,
                  int32_t* slots) {
  const MemoryView& m = *p.m;
  const int64_t k = p.opt->k;
  const detail::SlotPositions position(*m.placement, m.written[g]);
  const int64_t o = (g * p.num_queries + q) * k;
  const SearchOutput& out = *p.out;
  const ResultRows rows(p);
  for (int64_t j = 0; j < k; ++j) {
    const bool hit = j < found;
    const int32_t slot = hit ? best[j].slot : -1;
    if (out.scores) out.scores[o + j] = hit ? best[j].score : kNegInf;
    if (out.indices) out.indices[o + j] = hit ? position(slot) : -1;
    if (out.mask) out.mask[o + j] = hit;
    slots[j] = slot;
    if (hit) continue;
    if (rows.keys) rows.keys.zero(o + j);
    if (rows.values) rows.values.zero(o + j);
  }
}

// Result rows grouped by the panel of their slot (a counting sort), so that
// keys and values are copied panel by panel. A key in panels is spread over
// one cache line per dimension -- its whole 16-slot panel --, so copying hits
// in result order reads a panel per hit (for 32 hits of a query, 32 panels,
// mostly gone from L1 since the scan); in panel order each panel is read once,
// and the values row after row.
class PanelOrder {
 public:
  // Rows [0, n) of `slots`; slot -1 (a miss) is left out.
  void sort(const int32_t* slots, int64_t n, int64_t panels) {
    first_.assign(static_cast<std::size_t>(panels + 1), 0);
    order_.resize(static_cast<std::size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      if (slots[i] >= 0) ++first_[static_cast<std::size_t>(slots[i] / kPanelSlots + 1)];
    }
    for (int64_t b = 0; b < panels; ++b) first_[b + 1] += first_[b];
    std::vector<int64_t> next(first_.begin(), first_.end() - 1);
    for (int64_t i = 0; i < n; ++i) {
      if (slots[i] >= 0) order_[next[slots[i] / kPanelSlots]++] = static_cast<int32_t>(i);
    }
  }

  // Copies the hits in panels [b0, b1) of memory g, whose rows start at result row `row0`.
  void copy(const Plan& p, int64_t g, const int32_t* slots, int64_t row0, int64_t b0, int64_t b1,
            float* scratch) const {
    const ResultRows rows(p);
    const int64_t end = first_[b1];
    for (int64_t h = first_[b0]; h < end; ++h) {
      if (h + kPrefetchHits < end) prefetch_value(p, g, slots[order_[h + kPrefetchHits]]);
      const int64_t i = order_[h];
      copy_hit(p, rows, g, slots[i], row0 + i, scratch);
    }
    end_streams(p);
  }

 private:
  std::vector<int64_t> first_;  // [panels + 1]: where each panel's rows start in order_
  std::vector<int32_t> order_;  // rows, by panel
};

// The top-k of one query's bin winners: its rows of the partial states merged
// (ascending slot ranges: on equal scores the earlier, lower slot stays), then
// chosen and sorted by BestOf.
class BinSelect {
 public:
  explicit BinSelect(int64_t num_bins)
      : num_bins_(num_bins),
        score_(static_cast<std::size_t>(num_bins)),
        slot_(static_cast<std::size_t>(num_bins)) {}

  // Merges query row `row`; returns how many bins are not empty.
  int64_t merge(const Partial* parts, int64_t nparts, int64_t row) {
    const int64_t L = num_bins_;
    const float* best = parts[0].best + row * L;
    const int32_t* slot = parts[0].slot + row * L;
    if (nparts > 1) {
      std::copy_n(best, L, score_.data());
      std::copy_n(slot, L, slot_.data());
      for (int64_t s = 1; s < nparts; ++s) {
        const float* b = parts[s].best + row * L;
        const int32_t* t = parts[s].slot + row * L;
        for (int64_t i = 0; i < L; ++i) {  // branch-free, so that it vectorizes
          const int32_t take = -static_cast<int32_t>(b[i] > score_[i]);
          slot_[i] = (t[i] & take) | (slot_[i] & ~take);
          score_[i] = b[i] > score_[i] ? b[i] : score_[i];
        }
      }
      best = score_.data();
      slot = slot_.data();
    }
    return best_.set(best, slot, L);
  }

  // The best n (<= the filled bins) into out, in result order.
  void select(int64_t n, Candidate* out) {
    if (n == 0) return;
    best_.choose(n);
    best_.sorted(out);
  }

 private:
  int64_t num_bins_;
  std::vector<float> score_;
  std::vector<int32_t> slot_;
  detail::BestOf best_;
};

// Copies the keys and values of the hits of memories too big for the caches
// once every memory's results are known: each memory's hits in PanelOrder, cut
// into pieces of panels over the threads. (Smaller memories copy theirs in
// finish, a piece of queries at a time, while their panels are still cached.)
class Gather {
 public:
  explicit Gather(const Plan& p)
      : p_(p),
        per_memory_(p.num_queries * p.opt->k),
        panels_(padded_capacity(p.m->capacity) / kPanelSlots),
        orders_(static_cast<std::size_t>(p.m->grid)) {
    // Enough pieces per memory to keep every thread busy on a small grid.
    const int64_t want = 4 * static_cast<int64_t>(get_num_threads());
    pieces_ = std::clamp<int64_t>((want + p.m->grid - 1) / p.m->grid, 1, panels_);
  }

  void run() {
    detail::parallel_for(orders_.size(), [&](std::size_t g) {
      orders_[g].sort(p_.hit_slots + g * per_memory_, per_memory_, panels_);
    });
    detail::parallel_for(static_cast<std::size_t>(p_.m->grid * pieces_), [&](std::size_t i) {
      const int64_t g = static_cast<int64_t>(i) / pieces_;
      const int64_t piece = static_cast<int64_t>(i) % pieces_;
      std::vector<float> scratch(static_cast<std::size_t>(p_.m->key_dim));
      orders_[static_cast<std::size_t>(g)].copy(p_, g, p_.hit_slots + g * per_memory_,
                                                g * per_memory_, panels_ * piece / pieces_,
                                                panels_ * (piece + 1) / pieces_, scratch.data());
    });
  }

 private:
  const Plan& p_;
  int64_t per_memory_;
  int64_t panels_;
  int64_t pieces_ = 1;
  std::vector<PanelOrder> orders_;
};

// The two reductions of a search share one interface. A task's Partial
// begins one (Partial::begin: bins, or exact top-k buffers), the kernel adds
// every score of the task's slot range to it, and at the finish take(parts,
// nparts, row, out) gives a query's best candidates over every range: it
// writes them to `out` in result order and returns how many, or -1 when this
// reduction cannot answer (bins: fewer filled bins than the rows owed, which
// happens in memories that are not full) and the query is searched exactly.
class BinReduction {  // strided bins: the top-k of the bin winners
 public:
  BinReduction(int64_t num_bins, int64_t k, int64_t owed) : select_(num_bins), k_(k), owed_(owed) {}

  int64_t take(const Partial* parts, int64_t nparts, int64_t row, Candidate* out) {
    const int64_t filled = select_.merge(parts, nparts, row);
    if (filled < owed_) return -1;
    const int64_t n = std::min(k_, filled);
    select_.select(n, out);
    return n;
  }

 private:
  BinSelect select_;
  int64_t k_, owed_;
};

class TopKReduction {  // exact: the top-k of every range's kept candidates
 public:
  explicit TopKReduction(int64_t k) : k_(k) {}

  int64_t take(const Partial* parts, int64_t nparts, int64_t row, Candidate* out) {
    candidates_.clear();
    for (int64_t s = 0; s < nparts; ++s) {
      const cpu::TopKBuffers& t = parts[s].topk;
      for (int64_t i = 0; i < t.sizes[row]; ++i) {
        candidates_.push_back({t.scores[row * t.capacity + i], t.slots[row * t.capacity + i]});
      }
    }
    // `better` is total (slots differ): selecting, then sorting the few, is partial_sort.
    const int64_t n = std::min<int64_t>(k_, static_cast<int64_t>(candidates_.size()));
    const auto end = candidates_.begin() + n;
    if (end != candidates_.end())
      std::nth_element(candidates_.begin(), end, candidates_.end(), better);
    std::sort(candidates_.begin(), end, better);
    std::copy(candidates_.begin(), end, out);
    return n;
  }

 private:
  int64_t k_;
  std::vector<Candidate> candidates_;
};

// Queries [0, nq) of the partial states (rows from `shift`) through a
// reduction: best[q * k ..], found[q]. False if it could not answer one.
template <class Reduction>
bool take_all(Reduction&& reduction, const ValuePrefetch& values, const Partial* parts,
              int64_t nparts, int64_t shift, int64_t nq, int64_t k, Candidate* best,
              int64_t* found) {
  for (int64_t q = 0; q < nq; ++q) {
    values.step(q);
    const int64_t n = reduction.take(parts, nparts, q + shift, best + q * k);
    if (n < 0) return false;
    found[q] = n;
  }
  return true;
}

}  // namespace

// Merges the partial states of memory g's slot ranges (in ascending order)
// and writes the results of queries [q0, q1), which the partial states hold
// from their query `first` on. Returns false, writing nothing,
// if some query found fewer than min(k, live) candidates: in a memory that is
// not full, bins over physical slots can be empty, and then only an exact
// search returns every row the caller is owed.
bool finish(const Plan& p, int64_t g, int64_t q0, int64_t q1, Partial* parts, int64_t nparts,
            bool exact, int64_t first) {
  const int64_t shift = q0 - first;
  const int64_t live = std::min(p.m->written[g], p.m->capacity);
  const int64_t L = bins_for(p, live, exact);
  const int64_t k = p.opt->k;
  const int64_t owed = std::min(k, live);
  const int64_t nq = q1 - q0;
  std::vector<Candidate> best(static_cast<std::size_t>(nq * k));
  std::vector<int64_t> found(static_cast<std::size_t>(nq), 0);
  const ValuePrefetch values(p, g, nq, scan_range(p.m->capacity, p.m->written[g]).end);
  if (live > 0) {
    const bool answered = L > 0 ? take_all(BinReduction(L, k, owed), values, parts, nparts, shift,
                                           nq, k, best.data(), found.data())
                                : take_all(TopKReduction(k), values, parts, nparts, shift, nq, k,
                                           best.data(), found.data());
    if (!answered) return false;
  }
  // Slots of the results: for Gather (big memories), or copied here in panel order.
  std::vector<int32_t> own_slots;
  int32_t* slots = p.hit_slots ? p.hit_slots + (g * p.num_queries + q0) * k : nullptr;
  if (!slots) {
    own_slots.resize(static_cast<std::size_t>(nq * k));
    slots = own_slots.data();
  }
  for (int64_t q = 0; q < nq; ++q) {
    write_result(p, g, q0 + q, best.data() + q * k, found[q], slots + q * k);
  }
  if (p.hit_slots || (!p.out->keys && !p.out->values)) return true;
  const int64_t row0 = (g * p.num_queries + q0) * k;
  std::vector<float> scratch(static_cast<std::size_t>(p.m->key_dim));
  if (p.m->key_layout == KeyLayout::kRows) {  // rows: each key is one piece of memory
    const ResultRows rows(p);
    for (int64_t i = 0; i < nq * k; ++i) {
      if (slots[i] >= 0) copy_hit(p, rows, g, slots[i], row0 + i, scratch.data());
    }
    end_streams(p);
    return true;
  }
  const int64_t panels = padded_capacity(p.m->capacity) / kPanelSlots;
  PanelOrder order;
  order.sort(slots, nq * k, panels);
  order.copy(p, g, slots, row0, 0, panels, scratch.data());
  return true;
}

void gather(const Plan& p) { Gather(p).run(); }

}  // namespace knnmem::search_impl
