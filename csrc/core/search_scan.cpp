// A task's scan: its queries prepared for the metric and the scored key format
// (once per block of queries, shared by the tasks of its slot ranges), then the
// active CPU kernel over a range of slots (row-layout keys packed into
// panels a block at a time, as Memory::add would have stored them).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "core/assert.hpp"
#include "core/search_impl.hpp"
#include "core/store_key.hpp"

namespace knnmem::search_impl {

PreparedQueries prepare_queries(const Plan& p, int64_t g, int64_t q0, int64_t q1) {
  const MemoryView& m = *p.m;
  PreparedQueries out;
  out.g = g;
  out.q0 = q0;
  out.q1 = q1;
  const int64_t nq = q1 - q0;
  const int64_t dim = m.key_dim;
  const Metric metric = p.opt->metric;
  // Unit length for cosine, |q|^2 for l2, zero-padded to whole bfloat16
  // pairs, and rounded to pairs for bfloat16 keys.
  const KeyFormat format = scored_format(m, *p.opt);
  const int64_t pairs = (dim + 1) / 2;
  const int64_t q_stride = format == KeyFormat::kBFloat16 ? 2 * pairs : dim;
  out.q_stride = q_stride;
  out.rows.assign(static_cast<std::size_t>(nq * q_stride), 0.0f);
  out.sq.assign(static_cast<std::size_t>(nq), 0.0f);
  for (int64_t q = 0; q < nq; ++q) {
    float* row = out.rows.data() + q * q_stride;
    std::memcpy(row, p.queries + (g * p.num_queries + q0 + q) * dim, sizeof(float) * dim);
    if (metric == Metric::kInnerProduct) continue;
    out.sq[q] = cpu::squared_norm(row, dim);
    if (metric == Metric::kCosine && out.sq[q] > 0.0f) {
      const float inv = 1.0f / std::sqrt(out.sq[q]);
      for (int64_t i = 0; i < dim; ++i) row[i] *= inv;
    }
  }
  if (format == KeyFormat::kBFloat16) {
    out.words.resize(static_cast<std::size_t>(nq * pairs));
    for (int64_t q = 0; q < nq; ++q) {
      for (int64_t i = 0; i < pairs; ++i) {
        out.words[q * pairs + i] = detail::bf16_pair(out.rows.data() + q * q_stride, dim, i);
      }
    }
  } else if (format == KeyFormat::kInt8) {
    // 7-bit queries, q = scale * (u - 64) with u in [1, 127], so that every
    // variant (including u8 x s8 -> s16 pair sums) computes the same integers.
    const int64_t quads = key_words(KeyFormat::kInt8, dim);
    out.words.resize(static_cast<std::size_t>(nq * quads));
    out.scale.resize(static_cast<std::size_t>(nq));
    for (int64_t q = 0; q < nq; ++q) {
      const float* row = out.rows.data() + q * q_stride;
      float amax = 0.0f;
      for (int64_t i = 0; i < dim; ++i) amax = std::max(amax, std::abs(row[i]));
      out.scale[q] = amax / 63.0f;
      const float inv = amax > 0.0f ? 63.0f / amax : 0.0f;
      for (int64_t w = 0; w < quads; ++w) {
        uint32_t word = 0;
        for (int64_t b = 0; b < 4; ++b) {
          const int64_t i = 4 * w + b;
          const int32_t v = i < dim ? static_cast<int32_t>(std::lround(row[i] * inv)) : 0;
          word |= static_cast<uint32_t>(std::clamp(v, -63, 63) + 64) << (8 * b);
        }
        out.words[q * quads + w] = word;
      }
    }
  }
  return out;
}

void scan_part(const Plan& p, const PreparedQueries& queries, int64_t s_begin, int64_t s_end,
               bool exact, Partial& part, uint32_t* shared_bound) {
  const MemoryView& m = *p.m;
  const int64_t g = queries.g;
  const int64_t written = m.written[g];  // the search's snapshot, indexed by g
  const int64_t c = m.cell(g);           // where memory g is stored
  const int64_t nq = queries.q1 - queries.q0;
  const int64_t dim = m.key_dim;
  const Metric metric = p.opt->metric;
  const int64_t num_bins = bins_for(p, std::min(written, m.capacity), exact);
  part.begin(nq, num_bins, p.opt->k, shared_bound);
  if (s_begin >= s_end) return;
  const KeyFormat format = scored_format(m, *p.opt);

  const ScanRange range = scan_range(m.capacity, written);
  cpu::ScanArgs args;
  args.queries = queries.rows.data();
  args.query_sq = queries.sq.data();
  args.query_words = queries.words.data();
  args.query_scale = queries.scale.data();
  args.num_queries = nq;
  args.dim = dim;
  args.q_stride = queries.q_stride;
  args.key_format = format;
  args.key_words = key_words(format, dim);
  args.metric = metric;
  args.masked_begin = range.masked_begin;
  args.offset_of = m.placement->offset_of();
  args.written = written;
  args.num_bins = num_bins;
  args.bin_best = part.best;
  args.bin_slot = part.slot;
  args.topk = &part.topk;
  const cpu::ScanFn scan = cpu::active_kernel().scan;

  const int64_t padded = padded_capacity(m.capacity);
  if (m.key_layout == KeyLayout::kPanels) {
    KNNMEM_ASSERT(m.key_aux != nullptr || metric == Metric::kInnerProduct);
    KNNMEM_ASSERT(m.key_aux == nullptr || m.aux_metric == metric);
    args.panels =
        static_cast<const uint32_t*>(m.keys) + (c * padded + s_begin) * key_words(format, dim);
    args.key_aux = m.key_aux ? m.key_aux + c * padded + s_begin : nullptr;
    if (format == KeyFormat::kInt8) {
      args.key_scale = m.key_scale + c * padded + s_begin;
      args.key_sum = m.key_sum + c * padded + s_begin;
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
  const float* rows = static_cast<const float*>(m.keys) + c * m.capacity * m.key_stride;
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

}  // namespace knnmem::search_impl
