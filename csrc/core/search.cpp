// Search: a task per (memory, block of queries, range of slots) runs the
// active CPU kernel (fused scoring + strided-bin or exact top-k reduction, see
// cpu/kernels.hpp); ranges of one memory are merged bin by bin, then the exact
// top-k of the bin winners is selected and keys/values are gathered.
//
// Results do not depend on the number of threads or ranges: a bin keeps the
// highest score and, among equal scores, the lowest slot, which is what one
// ascending scan keeps too; the final order is (score desc, slot asc).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "core/assert.hpp"
#include "core/select.hpp"
#include "core/store_key.hpp"
#include "core/thread_pool.hpp"
#include "cpu/kernels.hpp"
#include "knnmem/knnmem.hpp"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace knnmem {
namespace {

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

ScanRange scan_range(int64_t capacity, int64_t written) {
  if (written >= capacity) return {capacity, capacity};
  const int64_t block = Placement::kPlacementBlock;
  const int64_t full = (written / block) * block;
  const int64_t end = written == full ? full : std::min(capacity, full + block);
  return {end, full};
}

// Reduction state of one task: bins or exact top-k buffers, per query.
struct Partial {
  std::vector<float> best;
  std::vector<int32_t> slot;
  std::vector<float> tk_scores;
  std::vector<int32_t> tk_slots;
  std::vector<int64_t> tk_sizes;
  std::vector<float> tk_thresholds;
  cpu::TopKBuffers topk;

  void init(int64_t nq, int64_t num_bins, int64_t k, uint32_t* shared_bound = nullptr) {
    if (num_bins > 0) {
      best.assign(static_cast<std::size_t>(nq * num_bins), kNegInf);
      slot.assign(static_cast<std::size_t>(nq * num_bins), -1);
      return;
    }
    const int64_t cap = std::max<int64_t>(2 * k, 256);
    tk_scores.resize(static_cast<std::size_t>(nq * cap));
    tk_slots.resize(static_cast<std::size_t>(nq * cap));
    tk_sizes.assign(static_cast<std::size_t>(nq), 0);
    tk_thresholds.assign(static_cast<std::size_t>(nq), kNegInf);
    topk = {tk_scores.data(), tk_slots.data(), tk_sizes.data(), tk_thresholds.data(), cap, k,
            shared_bound};
  }
};

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

// Bins for a memory holding `live` rows; 0 = exact top-k.
// The format keys are scored in: a panel memory's own, or the one asked for
// row-layout keys.
KeyFormat scored_format(const MemoryView& m, const SearchOptions& options) {
  return m.key_layout == KeyLayout::kPanels ? m.key_format : options.score_format;
}

int64_t bins_for(const Plan& p, int64_t live, bool exact) {
  return exact || p.num_bins == 0 || p.num_bins >= live ? 0 : p.num_bins;
}

// Scans slots [s_begin, s_end) of memory g for queries [q0, q1).
void scan_part(const Plan& p, int64_t g, int64_t q0, int64_t q1, int64_t s_begin, int64_t s_end,
               bool exact, Partial& part, uint32_t* shared_bound = nullptr) {
  const MemoryView& m = *p.m;
  const int64_t written = m.written[g];
  const int64_t nq = q1 - q0;
  const int64_t dim = m.key_dim;
  const Metric metric = p.opt->metric;
  const int64_t num_bins = bins_for(p, std::min(written, m.capacity), exact);
  part.init(nq, num_bins, p.opt->k, shared_bound);
  if (s_begin >= s_end) return;

  // Queries prepared for the metric (unit length for cosine, |q|^2 for l2),
  // zero-padded to whole bfloat16 pairs, and rounded to pairs for bfloat16 keys.
  const KeyFormat format = scored_format(m, *p.opt);
  const int64_t pairs = (dim + 1) / 2;
  const int64_t q_stride = format == KeyFormat::kBFloat16 ? 2 * pairs : dim;
  std::vector<float> qbuf(static_cast<std::size_t>(nq * q_stride), 0.0f);
  std::vector<float> q_sq(static_cast<std::size_t>(nq), 0.0f);
  std::vector<uint32_t> qwords;
  for (int64_t q = 0; q < nq; ++q) {
    float* row = qbuf.data() + q * q_stride;
    std::memcpy(row, p.queries + (g * p.num_queries + q0 + q) * dim, sizeof(float) * dim);
    if (metric == Metric::kInnerProduct) continue;
    q_sq[q] = cpu::squared_norm(row, dim);
    if (metric == Metric::kCosine && q_sq[q] > 0.0f) {
      const float inv = 1.0f / std::sqrt(q_sq[q]);
      for (int64_t i = 0; i < dim; ++i) row[i] *= inv;
    }
  }
  std::vector<float> q_scale;
  if (format == KeyFormat::kBFloat16) {
    qwords.resize(static_cast<std::size_t>(nq * pairs));
    for (int64_t q = 0; q < nq; ++q) {
      for (int64_t i = 0; i < pairs; ++i) {
        qwords[q * pairs + i] = detail::bf16_pair(qbuf.data() + q * q_stride, dim, i);
      }
    }
  } else if (format == KeyFormat::kInt8) {
    // 7-bit queries, q = scale * (u - 64) with u in [1, 127], so that every
    // variant (including u8 x s8 -> s16 pair sums) computes the same integers.
    const int64_t quads = key_words(KeyFormat::kInt8, dim);
    qwords.resize(static_cast<std::size_t>(nq * quads));
    q_scale.resize(static_cast<std::size_t>(nq));
    for (int64_t q = 0; q < nq; ++q) {
      const float* row = qbuf.data() + q * q_stride;
      float amax = 0.0f;
      for (int64_t i = 0; i < dim; ++i) amax = std::max(amax, std::abs(row[i]));
      q_scale[q] = amax / 63.0f;
      const float inv = amax > 0.0f ? 63.0f / amax : 0.0f;
      for (int64_t w = 0; w < quads; ++w) {
        uint32_t word = 0;
        for (int64_t b = 0; b < 4; ++b) {
          const int64_t i = 4 * w + b;
          const int32_t v = i < dim ? static_cast<int32_t>(std::lround(row[i] * inv)) : 0;
          word |= static_cast<uint32_t>(std::clamp(v, -63, 63) + 64) << (8 * b);
        }
        qwords[q * quads + w] = word;
      }
    }
  }

  const ScanRange range = scan_range(m.capacity, written);
  cpu::ScanArgs args;
  args.queries = qbuf.data();
  args.query_sq = q_sq.data();
  args.query_words = qwords.data();
  args.query_scale = q_scale.data();
  args.num_queries = nq;
  args.dim = dim;
  args.q_stride = q_stride;
  args.key_format = format;
  args.key_words = key_words(format, dim);
  args.metric = metric;
  args.masked_begin = range.masked_begin;
  args.offset_of = m.placement->offset_of();
  args.written = written;
  args.num_bins = num_bins;
  args.bin_best = part.best.data();
  args.bin_slot = part.slot.data();
  args.topk = &part.topk;
  const cpu::ScanFn scan = cpu::active_kernel().scan;

  const int64_t padded = padded_capacity(m.capacity);
  if (m.key_layout == KeyLayout::kPanels) {
    KNNMEM_ASSERT(m.key_aux != nullptr || metric == Metric::kInnerProduct);
    KNNMEM_ASSERT(m.key_aux == nullptr || m.aux_metric == metric);
    args.panels =
        static_cast<const uint32_t*>(m.keys) + (g * padded + s_begin) * key_words(format, dim);
    args.key_aux = m.key_aux ? m.key_aux + g * padded + s_begin : nullptr;
    if (format == KeyFormat::kInt8) {
      args.key_scale = m.key_scale + g * padded + s_begin;
      args.key_sum = m.key_sum + g * padded + s_begin;
    }
    args.begin = s_begin;
    args.end = s_end;
    scan(args);
    return;
  }
  // Row layout: pack a block at a time into panels of the scored format (and
  // its norm terms, scales and sums), as Memory::add would have stored it.
  const int64_t words = key_words(format, dim);
  std::vector<uint32_t> panels(static_cast<std::size_t>(kPackSlots * words), 0u);
  std::vector<float> aux(static_cast<std::size_t>(kPackSlots), 0.0f);
  std::vector<float> scale(static_cast<std::size_t>(kPackSlots), 0.0f);
  std::vector<int32_t> sum(static_cast<std::size_t>(kPackSlots), 0);
  const float* rows = static_cast<const float*>(m.keys) + g * m.capacity * m.key_stride;
  const bool norm = metric != Metric::kInnerProduct;
  for (int64_t b0 = s_begin; b0 < s_end; b0 += kPackSlots) {
    const int64_t b1 = std::min(s_end, b0 + kPackSlots);
    cpu::active_kernel().pack_keys(format, rows + b0 * m.key_stride, m.key_stride, b1 - b0, dim,
                                   panels.data(), scale.data(), sum.data());
    for (int64_t j = 0; j < b1 - b0; ++j) {
      const float sq =
          norm ? detail::stored_sq(format, panels.data() + (j - j % kPanelSlots) * words,
                                   j % kPanelSlots, dim, scale[j])
               : 0.0f;
      aux[j] = detail::aux_of(metric, sq);
    }
    args.panels = panels.data();
    args.key_aux = aux.data();
    args.key_scale = scale.data();
    args.key_sum = sum.data();
    args.begin = b0;
    args.end = b1;
    scan(args);
  }
}

// The stored key of a slot as float32 (bfloat16/float16 keys widened, int8 scaled).
const float* key_row(const MemoryView& m, int64_t g, int64_t slot, float* scratch) {
  if (m.key_layout == KeyLayout::kRows) {
    return static_cast<const float*>(m.keys) + (g * m.capacity + slot) * m.key_stride;
  }
  const int64_t base = g * padded_capacity(m.capacity) + slot / kPanelSlots * kPanelSlots;
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
    const float scale = m.key_scale[g * padded_capacity(m.capacity) + slot];
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

// Orders this thread's streaming stores before whatever publishes its results.
void end_streams(const Plan& p) {
#if defined(__SSE2__)
  if (p.stream) _mm_sfence();
#endif
  (void)p;
}

// A key in panels straight to a streamed result row, four dimensions per
// store (float32: one from each of four panel rows; bfloat16: two words of
// pairs; int8: one word, widened and scaled as key_row does), without a row
// in between. False (nothing written) where that does not apply (float16,
// rows, dimensions not a multiple of 4, results not streamed).
bool stream_panel_key(const Plan& p, int64_t g, int64_t slot, float* dst) {
#if defined(__SSE2__)
  const MemoryView& m = *p.m;
  if (!p.stream || m.key_layout != KeyLayout::kPanels || m.key_format == KeyFormat::kFloat16 ||
      m.key_dim % 4 != 0 || reinterpret_cast<uintptr_t>(dst) % 16 != 0) {
    return false;
  }
  const int64_t at = g * padded_capacity(m.capacity) + slot;  // the slot's entry
  const int64_t base = (at - slot % kPanelSlots) * key_words(m.key_format, m.key_dim);
  const int64_t S = kPanelSlots;
  if (m.key_format == KeyFormat::kFloat32) {
    const float* lane = static_cast<const float*>(m.keys) + base + slot % S;
    for (int64_t i = 0; i < m.key_dim; i += 4) {
      _mm_stream_ps(dst + i, _mm_setr_ps(lane[i * S], lane[(i + 1) * S], lane[(i + 2) * S],
                                         lane[(i + 3) * S]));
    }
    return true;
  }
  const uint32_t* lane = static_cast<const uint32_t*>(m.keys) + base + slot % S;
  if (m.key_format == KeyFormat::kBFloat16) {  // word w: dims 2w (low half), 2w + 1
    const int32_t high = static_cast<int32_t>(0xFFFF0000u);
    for (int64_t i = 0; i < m.key_dim; i += 4) {
      const int32_t w0 = static_cast<int32_t>(lane[i / 2 * S]);
      const int32_t w1 = static_cast<int32_t>(lane[(i / 2 + 1) * S]);
      _mm_stream_ps(dst + i,
                    _mm_castsi128_ps(_mm_setr_epi32(
                        static_cast<int32_t>(static_cast<uint32_t>(w0) << 16), w0 & high,
                        static_cast<int32_t>(static_cast<uint32_t>(w1) << 16), w1 & high)));
    }
    return true;
  }
  const __m128 scale = _mm_set1_ps(m.key_scale[at]);  // int8: word w holds dims 4w .. 4w + 3
  for (int64_t i = 0; i < m.key_dim; i += 4) {
    __m128i x = _mm_cvtsi32_si128(static_cast<int32_t>(lane[i / 4 * S]));
    x = _mm_unpacklo_epi8(x, x);  // byte b of the word to the top of 32-bit lane b
    x = _mm_srai_epi32(_mm_unpacklo_epi16(x, x), 24);
    _mm_stream_ps(dst + i, _mm_mul_ps(_mm_cvtepi32_ps(x), scale));
  }
  return true;
#else
  (void)p, (void)g, (void)slot, (void)dst;
  return false;
#endif
}

// Asks for the value row of a slot a few hits before it is copied: values are
// not touched by the scan, so they come from memory.
constexpr int64_t kPrefetchHits = 8;
void prefetch_value(const Plan& p, int64_t g, int64_t slot) {
  const MemoryView& m = *p.m;
  if (!p.out->values) return;
  const char* row =
      reinterpret_cast<const char*>(m.values + (g * m.capacity + slot) * m.value_stride);
  for (int64_t b = 0; b < m.value_dim * 4; b += 64) __builtin_prefetch(row + b);
}

// Brings a memory's value rows towards the caches while its queries' results
// are being selected, a slice per query, so that the copy after the selection
// reads them from the caches rather than from memory (the scan never touches
// values; waiting for them row by row took ~15% of a search of many small
// memories, M2). Only where the hits are dense enough -- at least one per
// kDenseHitRows live rows -- for the whole block to be worth reading, and the
// block small enough (kMaxPrefetchBytes) to still be cached when it is copied.
constexpr int64_t kDenseHitRows = 4;
constexpr int64_t kMaxPrefetchBytes = 4ll << 20;
class ValuePrefetch {
 public:
  ValuePrefetch(const Plan& p, int64_t g, int64_t num_queries, int64_t rows) {
    const MemoryView& m = *p.m;
    const int64_t bytes = rows * m.value_stride * 4;
    if (!p.out->values || p.hit_slots || num_queries * p.opt->k * kDenseHitRows < rows ||
        bytes > kMaxPrefetchBytes) {
      return;
    }
    begin_ = reinterpret_cast<const char*>(m.values + g * m.capacity * m.value_stride);
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

// The stored key and the value of a hit into result row o.
void copy_hit(const Plan& p, int64_t g, int64_t slot, int64_t o, float* scratch) {
  const MemoryView& m = *p.m;
  const SearchOutput& out = *p.out;
  if (out.keys && !stream_panel_key(p, g, slot, out.keys + o * m.key_dim)) {
    copy_floats(out.keys + o * m.key_dim, key_row(m, g, slot, scratch), m.key_dim, p.stream);
  }
  if (out.values) {
    copy_floats(out.values + o * m.value_dim, m.values + (g * m.capacity + slot) * m.value_stride,
                m.value_dim, p.stream);
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
  const int64_t written = m.written[g];
  const int64_t o = (g * p.num_queries + q) * k;
  const SearchOutput& out = *p.out;
  for (int64_t j = 0; j < k; ++j) {
    const bool hit = j < found;
    const int32_t slot = hit ? best[j].slot : -1;
    out.scores[o + j] = hit ? best[j].score : kNegInf;
    out.indices[o + j] = hit ? position_of_slot(*m.placement, written, slot) : -1;
    out.mask[o + j] = hit;
    slots[j] = slot;
    if (hit) continue;
    if (out.keys) std::fill_n(out.keys + (o + j) * m.key_dim, m.key_dim, 0.0f);
    if (out.values) std::fill_n(out.values + (o + j) * m.value_dim, m.value_dim, 0.0f);
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
    const int64_t end = first_[b1];
    for (int64_t h = first_[b0]; h < end; ++h) {
      if (h + kPrefetchHits < end) prefetch_value(p, g, slots[order_[h + kPrefetchHits]]);
      const int64_t i = order_[h];
      copy_hit(p, g, slots[i], row0 + i, scratch);
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
    const float* best = parts[0].best.data() + row * L;
    const int32_t* slot = parts[0].slot.data() + row * L;
    if (nparts > 1) {
      std::copy_n(best, L, score_.data());
      std::copy_n(slot, L, slot_.data());
      for (int64_t s = 1; s < nparts; ++s) {
        const float* b = parts[s].best.data() + row * L;
        const int32_t* t = parts[s].slot.data() + row * L;
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
  if (live > 0 && L > 0) {
    BinSelect bins(L);
    for (int64_t q = 0; q < nq; ++q) {
      values.step(q);
      const int64_t filled = bins.merge(parts, nparts, q + shift);
      if (filled < owed) return false;
      found[q] = std::min(k, filled);
      bins.select(found[q], best.data() + q * k);
    }
  } else if (live > 0) {
    std::vector<Candidate> c;
    for (int64_t q = 0; q < nq; ++q) {
      values.step(q);
      c.clear();
      for (int64_t s = 0; s < nparts; ++s) {
        const cpu::TopKBuffers& t = parts[s].topk;
        const int64_t row = q + shift;
        for (int64_t i = 0; i < t.sizes[row]; ++i) {
          c.push_back({t.scores[row * t.capacity + i], t.slots[row * t.capacity + i]});
        }
      }
      // `better` is total (slots differ): selecting, then sorting the few, is partial_sort.
      found[q] = std::min<int64_t>(k, static_cast<int64_t>(c.size()));
      const auto end = c.begin() + found[q];
      if (end != c.end()) std::nth_element(c.begin(), end, c.end(), better);
      std::sort(c.begin(), end, better);
      std::copy(c.begin(), end, best.begin() + q * k);
    }
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
    for (int64_t i = 0; i < nq * k; ++i) {
      if (slots[i] >= 0) copy_hit(p, g, slots[i], row0 + i, scratch.data());
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

// Exact search of memory g for queries [q0, q1) in this thread.
void search_exact(const Plan& p, int64_t g, int64_t q0, int64_t q1) {
  Partial part;
  scan_part(p, g, q0, q1, 0, scan_range(p.m->capacity, p.m->written[g]).end, true, part);
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
      scan_part(p, g, q0, q1, 0, scan_range(memory.capacity, memory.written[g]).end, false, part);
      if (!finish(p, g, q0, q1, &part, 1, false, q0)) search_exact(p, g, q0, q1);
    });
    return;
  }
  std::vector<Partial> parts(static_cast<std::size_t>(tasks * p.splits));
  // Exact top-k over split slot ranges: the ranges of a query chunk share a
  // lower bound on each query's k-th score (TopKBuffers::shared_bound).
  std::vector<uint32_t> bounds(static_cast<std::size_t>(tasks * p.q_chunk), 0u);
  detail::parallel_for(parts.size(), [&](std::size_t i) {
    const int64_t t = static_cast<int64_t>(i) / p.splits;
    const int64_t g = t / p.chunks;
    const auto [q0, q1] = queries_of(t % p.chunks);
    const int64_t end = scan_range(memory.capacity, memory.written[g]).end;
    const auto [s0, s1] = split_range(end, static_cast<int64_t>(i) % p.splits, p.splits);
    scan_part(p, g, q0, q1, s0, s1, false, parts[i], bounds.data() + t * p.q_chunk);
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
                     const SearchOptions& options, const SearchOutput& out);

}  // namespace

void search(const MemoryView& memory, const float* queries, int64_t num_queries,
            const SearchOptions& options, const SearchOutput& out) {
  check_search_options(options.k, options.recall_target, memory.capacity);
  // A caller-owned ring may be changed by another thread during the call. Its
  // counters are read once, here: every slot range, mask and stream position
  // below comes from this snapshot, so a concurrent add or clear can make the
  // result stale or mix rows of two steps, but never send a read out of bounds.
  std::vector<int64_t> written(memory.written, memory.written + memory.grid);
  for (int64_t g = 0; g < memory.grid; ++g) {
    if (written[g] < 0) {
      throw InvalidArgument("written: expected counts >= 0, got " + std::to_string(written[g]) +
                            " at index [" + std::to_string(g) + "]");
    }
  }
  MemoryView snapshot = memory;
  snapshot.written = written.data();
  search_snapshot(snapshot, queries, num_queries, options, out);
}

namespace {

void search_snapshot(const MemoryView& memory, const float* queries, int64_t num_queries,
                     const SearchOptions& options, const SearchOutput& out) {
  const KeyFormat format = scored_format(memory, options);
  const int64_t num_bins = bins_for_search(options.k, options.recall_target, format);
  KNNMEM_ASSERT(memory.placement != nullptr && memory.placement->capacity() == memory.capacity);
  KNNMEM_ASSERT(out.scores && out.indices && out.mask);
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
  const int64_t result_bytes =
      memory.grid * num_queries * options.k * 4 *
      ((out.keys ? memory.key_dim : 0) + (out.values ? memory.value_dim : 0));
  p.stream = result_bytes > kStreamResultBytes;
  find_results(p);
  if (p.hit_slots) Gather(p).run();
}

}  // namespace
}  // namespace knnmem
