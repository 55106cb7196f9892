// The scan algorithm, generic over a vector type V. Included once by each
// variant's translation unit (scan_<name>.cpp) after it defines V; see
// kernels.hpp for the layout and the rules these units follow.
//
// V provides: W (lanes), F (float vector), I (int32 vector), M (lane mask),
// kMaskedStores (masked stores are cheap: the bins keep only improving lanes),
// zero, load, store, set1, fma(a, b, c) = a * b + c, mul, add, sub, min,
// floor(v, lo) = v > lo ? v : lo (lo where v is NaN), gt,
// from_bits, bits, mask_and, select(m, a, b) = m ? a : b, mask_load (lanes off
// the mask read nothing), mask_store, mask_store_slots, slots(first) = first +
// lane, load_slots, store_slots, select_slots; load_f16 (W halves -> floats); for bfloat16 keys
// widen_even and widen_odd (W words -> their
// even or odd dims as floats), or, where kNativeBF16, load_words, set1_word and dot_bf16 (pairwise
// dot).
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "cpu/kernels.hpp"

namespace knnmem::cpu {
namespace {

template <class V>
struct Scan {
  static constexpr int W = V::W;
  static constexpr int64_t kBlock = 256;                    // slots per key block (L2-resident)
  static constexpr int64_t kStridedBlockBytes = 384 << 10;  // keys per block of strided tiles
  static constexpr uint32_t kAll = W == 32 ? 0xFFFFFFFFu : (1u << W) - 1;
  using F = typename V::F;

  static int64_t lo(int64_t a, int64_t b) { return a < b ? a : b; }

  const ScanArgs& a;

  // Lanes of the vector at slot s that hold a live row.
  uint32_t live_lanes(int64_t s) const {
    if (s + W <= a.end && s + W <= a.masked_begin) return kAll;
    uint32_t bits = 0;
    for (int l = 0; l < W; ++l) {
      const int64_t slot = s + l;
      const bool ok = slot < a.end && (slot < a.masked_begin || a.offset_of[slot] < a.written);
      bits |= static_cast<uint32_t>(ok) << l;
    }
    return bits;
  }

  // The W bins from best / slot take the lanes of v (slots `slots`) that beat them.
  static void store_improved(float* best, int32_t* slot, F v, typename V::I slots) {
    if constexpr (V::kMaskedStores) {  // store only the lanes that improve
      const auto take = V::gt(v, V::load(best));
      V::mask_store(best, take, v);
      V::mask_store_slots(slot, take, slots);
    } else {  // blend and store
      const F old = V::load(best);
      const auto take = V::gt(v, old);
      V::store(best, V::select(take, v, old));
      V::store_slots(slot, V::select_slots(take, slots, V::load_slots(slot)));
    }
  }

  // Folds the scores v of slots s.. (first bin b = s mod L) into query q's bins.
  // `slots` holds s, s+1, .. s+W-1.
  void reduce_bins(int64_t q, F v, int64_t s, int64_t b, typename V::I slots) const {
    const int64_t L = a.num_bins;
    float* best = a.bin_best + q * L;
    int32_t* slot = a.bin_slot + q * L;
    if (L < W) {  // several lanes share a bin: one lane at a time
      float tmp[W];
      V::store(tmp, v);
      for (int l = 0; l < W; ++l) {
        const int64_t bin = (b + l) % L;
        if (tmp[l] > best[bin]) {
          best[bin] = tmp[l];
          slot[bin] = static_cast<int32_t>(s + l);
        }
      }
      return;
    }
    if (b + W <= L) {  // bins b .. b+W-1: whole vectors
      store_improved(best + b, slot + b, v, slots);
      return;
    }
    // The run of bins wraps: lanes [0, L-b) go to bins b.., the rest to 0..
    const auto head = V::from_bits((1u << (L - b)) - 1);
    const auto tail = V::from_bits(kAll & ~((1u << (L - b)) - 1));
    float* best_tail = best + b - L;  // lane l >= L-b maps to bin b + l - L
    int32_t* slot_tail = slot + b - L;
    const F old = V::select(head, V::mask_load(best + b, head), V::mask_load(best_tail, tail));
    const auto take = V::gt(v, old);
    V::mask_store(best + b, V::mask_and(take, head), v);
    V::mask_store(best_tail, V::mask_and(take, tail), v);
    V::mask_store_slots(slot + b, V::mask_and(take, head), slots);
    V::mask_store_slots(slot_tail, V::mask_and(take, tail), slots);
  }

  void reduce_topk(int64_t q, F v, int64_t s) const {
    const TopKBuffers& t = *a.topk;
    uint32_t bits = V::bits(V::gt(v, V::set1(t.thresholds[q])));
    if (bits == 0) return;
    float tmp[W];
    V::store(tmp, v);
    while (bits != 0) {
      const int l = __builtin_ctz(bits);
      bits &= bits - 1;
      if (!(tmp[l] > t.thresholds[q])) continue;  // raised by a compaction
      const int64_t n = t.sizes[q];
      t.scores[q * t.capacity + n] = tmp[l];
      t.slots[q * t.capacity + n] = static_cast<int32_t>(s + l);
      t.sizes[q] = n + 1;
      if (n + 1 == t.capacity) compact_topk(t, q);
    }
  }

  // Where the vector of slots starting at `slot` lies in the panel data, for
  // keys stored `rows` words (floats or bf16 pairs) per slot.
  template <class T>
  const T* panel_at(int64_t slot, int64_t rows) const {
    return static_cast<const T*>(a.panels) + ((slot - a.begin) / kPanel) * rows * kPanel +
           slot % kPanel;
  }

  // A single query reads each key once, so its scan waits on memory: there
  // every line of the tile's panels is asked for `ahead` bytes (whole panels)
  // before use (the hardware prefetcher alone left ~20% of the read bandwidth
  // unused on M4). With more queries the keys come from L2 and this compiles away.
  template <int R>
  static void prefetch_ahead(const void* line, int64_t ahead) {
    if constexpr (R == 1) __builtin_prefetch(static_cast<const char*>(line) + ahead, 0, 2);
  }

  // acc[r][c] = <query q0 + r, keys of the vector of slots from s + c * step>.
  // `ahead`: bytes from each of them to the lines prefetch_ahead asks for.
  template <KeyFormat KF, int R, int C>
  void accumulate(int64_t q0, int64_t s, int64_t step, int64_t ahead, F (&acc)[R][C]) const {
    if constexpr (KF == KeyFormat::kFloat32) {
      const int64_t dim = a.dim;
      const float* kp[C];
      for (int c = 0; c < C; ++c) kp[c] = panel_at<float>(s + c * step, dim);
      const float* qp = a.queries + q0 * a.q_stride;
      for (int64_t i = 0; i < dim; ++i) {
        F kv[C];
        for (int c = 0; c < C; ++c) prefetch_ahead<R>(kp[c] + i * kPanel, ahead);
        for (int c = 0; c < C; ++c) kv[c] = V::load(kp[c] + i * kPanel);
        for (int r = 0; r < R; ++r) {
          const F qv = V::set1(qp[r * a.q_stride + i]);
          for (int c = 0; c < C; ++c) acc[r][c] = V::fma(qv, kv[c], acc[r][c]);
        }
      }
    } else if constexpr (KF == KeyFormat::kBFloat16) {
      // bfloat16 pairs: word i of a slot holds dims 2i (low half) and 2i+1
      const int64_t rows = (a.dim + 1) / 2;
      const uint32_t* kp[C];
      for (int c = 0; c < C; ++c) kp[c] = panel_at<uint32_t>(s + c * step, rows);
      if constexpr (V::kNativeBF16) {  // one dot-product instruction per pair
        const uint32_t* qw = a.query_words + q0 * rows;
        for (int64_t i = 0; i < rows; ++i) {
          typename V::I kv[C];
          for (int c = 0; c < C; ++c) prefetch_ahead<R>(kp[c] + i * kPanel, ahead);
          for (int c = 0; c < C; ++c) kv[c] = V::load_words(kp[c] + i * kPanel);
          for (int r = 0; r < R; ++r) {
            const auto qv = V::set1_word(qw[r * rows + i]);
            for (int c = 0; c < C; ++c) acc[r][c] = V::dot_bf16(acc[r][c], qv, kv[c]);
          }
        }
      } else {
        // Widened to float32 one half at a time: the even dims of the C vectors,
        // their FMAs with every query, then the odd dims -- C widened vectors
        // live at once (not 2C), so the tile has as many queries as float32's
        // and each widening serves R queries. Every accumulator still takes
        // dim 2i before 2i+1 (queries kept in float32).
        const float* qp = a.queries + q0 * a.q_stride;
        for (int64_t i = 0; i < rows; ++i) {
          F kv[C];
          for (int c = 0; c < C; ++c) prefetch_ahead<R>(kp[c] + i * kPanel, ahead);
          for (int c = 0; c < C; ++c) kv[c] = V::widen_even(kp[c] + i * kPanel);
          for (int r = 0; r < R; ++r) {
            const F qe = V::set1(qp[r * a.q_stride + 2 * i]);
            for (int c = 0; c < C; ++c) acc[r][c] = V::fma(qe, kv[c], acc[r][c]);
          }
          for (int c = 0; c < C; ++c) kv[c] = V::widen_odd(kp[c] + i * kPanel);
          for (int r = 0; r < R; ++r) {
            const F qo = V::set1(qp[r * a.q_stride + 2 * i + 1]);
            for (int c = 0; c < C; ++c) acc[r][c] = V::fma(qo, kv[c], acc[r][c]);
          }
        }
      }
    } else if constexpr (KF == KeyFormat::kFloat16) {
      // halves laid out like float32 keys ([dims rounded up to even][16] per
      // panel), widened to float32; queries stay float32
      const int64_t dim = a.dim;
      const uint16_t* kp[C];
      for (int c = 0; c < C; ++c) kp[c] = panel_at<uint16_t>(s + c * step, 2 * ((dim + 1) / 2));
      const float* qp = a.queries + q0 * a.q_stride;
      for (int64_t i = 0; i < dim; ++i) {
        F kv[C];
        if (i % 2 == 0) {  // a line holds two dims' halves
          for (int c = 0; c < C; ++c) prefetch_ahead<R>(kp[c] + i * kPanel, ahead);
        }
        for (int c = 0; c < C; ++c) kv[c] = V::load_f16(kp[c] + i * kPanel);
        for (int r = 0; r < R; ++r) {
          const F qv = V::set1(qp[r * a.q_stride + i]);
          for (int c = 0; c < C; ++c) acc[r][c] = V::fma(qv, kv[c], acc[r][c]);
        }
      }
    } else {  // int8: four dims per word, 7-bit unsigned queries, integer sums
      const int64_t rows = (a.dim + 3) / 4;
      const uint32_t* kp[C];
      for (int c = 0; c < C; ++c) kp[c] = panel_at<uint32_t>(s + c * step, rows);
      const uint32_t* qw = a.query_words + q0 * rows;
      typename V::I sums[R][C];
      for (int r = 0; r < R; ++r) {
        for (int c = 0; c < C; ++c) sums[r][c] = V::izero();
      }
      for (int64_t i = 0; i < rows; ++i) {
        typename V::I kv[C];
        for (int c = 0; c < C; ++c) prefetch_ahead<R>(kp[c] + i * kPanel, ahead);
        for (int c = 0; c < C; ++c) kv[c] = V::load_words(kp[c] + i * kPanel);
        for (int r = 0; r < R; ++r) {
          const auto qv = V::set1_word(qw[r * rows + i]);
          for (int c = 0; c < C; ++c) sums[r][c] = V::dot_u8s8(sums[r][c], qv, kv[c]);
        }
      }
      // sum (u - 64) k8 = sum u k8 - 64 sum k8; then both scales. These two
      // loops must unroll completely: left as loops, GCC keeps `sums` in
      // memory and stores every accumulator on each step of the loop above
      // (measured: 1.7x slower int8 scans on AVX512_VNNI). Starting the sums
      // at -64 sum k8 instead does the same to GCC 12 (measured: 1.7x slower).
#pragma GCC unroll 16
      for (int c = 0; c < C; ++c) {
        const int64_t at = s + c * step - a.begin;
        const auto offset = V::shl6(V::load_slots(a.key_sum + at));
        const F key_scale = V::load(a.key_scale + at);
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) {
          const F scale = V::mul(key_scale, V::set1(a.query_scale[q0 + r]));
          acc[r][c] = V::mul(V::to_float(V::isub(sums[r][c], offset)), scale);
        }
      }
    }
  }

  // Scores of R queries (from q0) against C vectors of slots, then the metric,
  // the live mask and the reduction. Contiguous tiles (kStrided false) cover
  // slots s .. s + C W - 1; `bin` = s mod num_bins (0 without bins). Strided
  // tiles cover the vectors at s, s + L, .., s + (C - 1) L (L = num_bins, a
  // multiple of W): all on the bins from `bin`, so they are reduced in
  // registers first -- in slot order, keeping the first of equal scores -- and
  // reach the bins in memory once per query.
  template <KeyFormat KF, int R, int C, bool kStrided = false>
  void tile(int64_t q0, int64_t s, int64_t bin) const {
    const int64_t step = kStrided ? a.num_bins : W;
    F acc[R][C];
    for (int r = 0; r < R; ++r) {
      for (int c = 0; c < C; ++c) acc[r][c] = V::zero();
    }
    // The next tile: a panel on in each strided vector, C W slots on in contiguous ones.
    const int64_t ahead_panels = kStrided ? 1 : std::max<int64_t>(1, C * W / kPanel);
    accumulate<KF, R, C>(q0, s, step, ahead_panels * a.key_words * kPanel * 4, acc);
    F best[R];
    typename V::I best_slots[R];
    // Fields of `a` in locals: the stores into the bins and buffers could
    // alias them (int32 slots vs. the metric), and reloading them after each
    // store showed in profiles. The loops over the tile unroll completely, so
    // that acc stays in registers (left as loops, GCC stores the tile to the
    // stack and indexes it: ~14% of an avx2 float32 scan went to this epilogue).
    const Metric metric = a.metric;
    const float* key_aux = a.key_aux;
    const int64_t begin = a.begin;
    const F neg_inf = V::set1(-std::numeric_limits<float>::infinity());
    const F lowest = V::set1(std::numeric_limits<float>::lowest());
#pragma GCC unroll 16
    for (int c = 0; c < C; ++c) {
      const int64_t sc = s + c * step;
      if (!kStrided && sc >= a.end) break;
      const uint32_t live = live_lanes(sc);
      const auto live_mask = V::from_bits(live);
      F aux = V::zero();
      if (metric != Metric::kInnerProduct) aux = V::load(key_aux + (sc - begin));
      if (!kStrided && c > 0) bin = next_bin(bin, W);
      const auto slots = V::slots(static_cast<int32_t>(sc));
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        F v = acc[r][c];
        if (metric == Metric::kCosine) {
          v = V::mul(v, aux);
        } else if (metric == Metric::kL2) {  // -|q-k|^2 = min(0, 2<q,k> - |q|^2 - |k|^2)
          const F norms = V::add(V::set1(a.query_sq[q0 + r]), aux);
          v = V::min(V::zero(), V::sub(V::add(v, v), norms));
        }
        // A live row whose score is NaN or -inf (finite keys and queries whose
        // product or distance overflows, or a NaN written into a caller's ring)
        // ranks as the lowest finite score, so it is still found: -inf is left
        // for dead slots and empty bins. (gt is false for NaN.)
        v = V::floor(v, lowest);
        if (live != kAll) v = V::select(live_mask, v, neg_inf);
        if constexpr (kStrided) {
          if (c == 0) {
            best[r] = v;
            best_slots[r] = slots;
          } else {
            const auto take = V::gt(v, best[r]);
            best[r] = V::select(take, v, best[r]);
            best_slots[r] = V::select_slots(take, slots, best_slots[r]);
          }
        } else if (a.num_bins > 0) {
          reduce_bins(q0 + r, v, sc, bin, slots);
        } else {
          reduce_topk(q0 + r, v, sc);
        }
      }
    }
    if constexpr (kStrided) {  // bins bin .. bin + W - 1 of each query: whole vectors
      const int64_t L = a.num_bins;
      float* bin_best = a.bin_best + q0 * L + bin;
      int32_t* bin_slot = a.bin_slot + q0 * L + bin;
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r)
        store_improved(bin_best + r * L, bin_slot + r * L, best[r], best_slots[r]);
    }
  }

  // The bin of the slot `by` after one in bin `bin` (no division per vector).
  int64_t next_bin(int64_t bin, int64_t by) const {
    if (a.num_bins == 0) return 0;
    for (bin += by; bin >= a.num_bins;) bin -= a.num_bins;
    return bin;
  }

  template <KeyFormat KF, int R, int C>
  void rows_of_block(int64_t q0, int64_t s0, int64_t s1) const {
    int64_t s = s0;
    int64_t bin = a.num_bins > 0 ? s0 % a.num_bins : 0;
    for (; s + C * W <= s1; s += C * W, bin = next_bin(bin, C * W)) tile<KF, R, C>(q0, s, bin);
    for (; s < s1; s += W, bin = next_bin(bin, W)) tile<KF, R, 1>(q0, s, bin);
  }

  // Strided tiles over the C L slots from s0: one per vector of bins.
  template <KeyFormat KF, int R, int C>
  void rows_of_strided_block(int64_t q0, int64_t s0) const {
    int64_t bin = s0 % a.num_bins;
    for (int64_t t = 0; t < a.num_bins; t += W, bin = next_bin(bin, W)) {
      tile<KF, R, C, true>(q0, s0 + t, bin);
    }
  }

  // Every query, in tiles of R, then R / 2, then single rows.
  template <KeyFormat KF, int R, class Rows>
  void for_queries(Rows rows) const {
    int64_t q = 0;
    for (; q + R <= a.num_queries; q += R) rows(q, std::integral_constant<int, R>{});
    if constexpr (R / 2 > 1) {
      if (a.num_queries - q >= R / 2) {
        rows(q, std::integral_constant<int, R / 2>{});
        q += R / 2;
      }
    }
    for (; q < a.num_queries; ++q) rows(q, std::integral_constant<int, 1>{});
  }

  // Tiles of R queries x C vectors over blocks of slots. With bins in whole
  // vectors (L a multiple of W) and C L slots of keys small enough for L2, the
  // slots go in blocks of C L, in strided tiles; the rest in blocks of kBlock.
  template <KeyFormat KF, int R, int C>
  void run() const {
    const int64_t L = a.num_bins;
    int64_t s0 = a.begin;
    if (L >= W && L % W == 0 && C * L * 4 * a.key_words <= kStridedBlockBytes) {
      for (; s0 + C * L <= a.end; s0 += C * L) {
        for_queries<KF, R>([&](int64_t q, auto rows) {
          rows_of_strided_block<KF, decltype(rows)::value, C>(q, s0);
        });
      }
    }
    for (; s0 < a.end; s0 += kBlock) {
      const int64_t s1 = lo(a.end, s0 + kBlock);
      for_queries<KF, R>(
          [&](int64_t q, auto rows) { rows_of_block<KF, decltype(rows)::value, C>(q, s0, s1); });
    }
  }
};

// The scan for the key format of `args`, with a tile shape (queries x vectors
// of slots) per format: float32 and float16 (R32 x C32), bfloat16 (R16 x C16)
// and int8 (R8 x C8) keys need different numbers of registers besides the tile.
template <class V, int R32, int C32, int R16, int C16, int R8, int C8>
void scan_any_format(const ScanArgs& args) {
  const Scan<V> scan{args};
  if (args.key_format == KeyFormat::kBFloat16) {
    scan.template run<KeyFormat::kBFloat16, R16, C16>();
  } else if (args.key_format == KeyFormat::kFloat16) {
    scan.template run<KeyFormat::kFloat16, R32, C32>();
  } else if (args.key_format == KeyFormat::kInt8) {
    scan.template run<KeyFormat::kInt8, R8, C8>();
  } else {
    scan.template run<KeyFormat::kFloat32, R32, C32>();
  }
}

}  // namespace
}  // namespace knnmem::cpu
