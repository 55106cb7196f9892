// CPU scan kernels: fused scoring + reduction over a memory's slots.
//
// Keys are stored in panels: slots 16p .. 16p+15 of a memory form panel p,
// laid out [dim][16] (dimension-major), so one vector load holds one
// dimension of 16 consecutive slots. A register tile of R queries x C vectors
// of slots accumulates dot products with one broadcast-FMA per query and
// dimension; the finished tile goes straight into the reduction -- per-bin
// running max and slot (strided bins: slot s -> bin s mod L), or a thresholded
// candidate buffer for exact top-k. No score matrix exists beyond registers.
//
// Variants (portable, avx2, avx_vnni, avx512, avx512_vnni_bf16 -- avx_vnni
// differs from avx2 only in scoring int8 keys with vpdpbusd, avx512_vnni_bf16
// from avx512 in scoring bfloat16 keys with vdpbf16ps and int8 keys with
// vpdpbusd) are
// separate translation units compiled
// with their own ISA flags and chosen at run time from CPU features, or forced
// with KNNMEM_KERNEL=<name> / set_kernel(). Those units use no standard-library
// templates (whose out-of-line copies the linker could share with baseline
// code) and keep everything else in an anonymous namespace.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "knnmem/knnmem.hpp"

namespace knnmem::cpu {

inline constexpr int64_t kPanel = 16;

// Per-query candidate buffers for exact top-k. A buffer takes scores above
// its threshold; when it fills up, compact_topk keeps the best k and raises
// the threshold to the k-th best score.
struct TopKBuffers {
  float* scores = nullptr;      // [num_queries][capacity]
  int32_t* slots = nullptr;     // [num_queries][capacity]
  int64_t* sizes = nullptr;     // [num_queries]
  float* thresholds = nullptr;  // [num_queries], start at -inf
  int64_t capacity = 0;         // >= 2k
  int64_t k = 0;
  // Optional, [num_queries], shared by the buffers of the other slot ranges of
  // the same queries: the best k-th score any of them has compacted to, as an
  // ordered integer (core/select.hpp, ordered_score; 0 = none yet). No range's
  // top-k entry scores below it, so compactions raise the threshold to it
  // (keeping equal scores: a lower slot elsewhere may tie).
  uint32_t* shared_bound = nullptr;
};
void compact_topk(const TopKBuffers& buffers, int64_t query);

struct ScanArgs {
  // Queries [num_queries][q_stride], already prepared for the metric (unit
  // length for cosine), zero-padded to q_stride >= dim (2 * ceil(dim / 2) for
  // bfloat16 keys); query_sq[q] = |q|^2 (l2 only). For bfloat16 keys also
  // query_words [num_queries][ceil(dim / 2)]: the queries rounded to bfloat16
  // pairs, in the layout of the keys. For int8 keys query_words holds
  // [num_queries][ceil(dim / 4)] words of four unsigned 7-bit values u = 64 +
  // round(q / query_scale), lowest byte first.
  const float* queries = nullptr;
  const float* query_sq = nullptr;
  const uint32_t* query_words = nullptr;
  const float* query_scale = nullptr;  // int8 keys: q ~= query_scale * (u - 64)
  int64_t num_queries = 0;
  int64_t dim = 0;
  int64_t q_stride = 0;
  Metric metric = Metric::kInnerProduct;
  // Slots [begin, end) are scanned; begin is a multiple of kPanel. `panels`
  // points at the panel of slot `begin` (float32: [dim][16] floats per panel;
  // bfloat16: [ceil(dim / 2)][16] words, word i holding dims 2i and 2i+1),
  // `key_aux` at the entry of slot `begin`: 1/|k| for cosine (0 for a zero
  // key), |k|^2 for l2, unused for ip.
  KeyFormat key_format = KeyFormat::kFloat32;
  int64_t key_words = 0;  // 32-bit words per slot: key_words(key_format, dim)
  const void* panels = nullptr;
  const float* key_aux = nullptr;
  // int8 keys (from slot `begin`): k ~= key_scale * k8, key_sum = sum of k8.
  const float* key_scale = nullptr;
  const int32_t* key_sum = nullptr;
  int64_t begin = 0;
  int64_t end = 0;
  // Slots >= masked_begin are live only if offset_of[slot] < written.
  int64_t masked_begin = 0;
  const int32_t* offset_of = nullptr;
  int64_t written = 0;
  // Reduction: num_bins > 0 -> bins, [num_queries][num_bins] arrays indexed by
  // absolute slot mod num_bins; num_bins == 0 -> topk.
  int64_t num_bins = 0;
  float* bin_best = nullptr;
  int32_t* bin_slot = nullptr;
  const TopKBuffers* topk = nullptr;
};

using ScanFn = void (*)(const ScanArgs&);
// The counting loops of core/select.hpp (cpu/select_impl.hpp has their contracts).
using KthKeyFn = uint32_t (*)(const uint32_t* key, int64_t n, int64_t want, uint32_t lo,
                              uint32_t hi);
using RankFn = void (*)(const uint32_t* key, const int32_t* slot, int64_t m, int32_t* rank);
// Stores n float32 rows (`stride` floats apart) into panels of a key format
// exactly as store_key does (words, and int8 scales and sums),
// row j into lane j % kPanelSlots of panel j / kPanelSlots (cpu/pack_impl.hpp).
using PackKeysFn = void (*)(KeyFormat format, const float* rows, int64_t stride, int64_t n,
                            int64_t dim, uint32_t* panels, float* scale, int32_t* sum);

struct Kernel {
  const char* name;
  ScanFn scan;
  KthKeyFn kth_key;
  RankFn rank;
  PackKeysFn pack_keys;
};

// The variant in use: KNNMEM_KERNEL if set (and supported), else the best
// one this CPU supports. Throws InvalidArgument for an unknown or
// unsupported name.
const Kernel& active_kernel();
void set_kernel(const std::string& name);  // "" = automatic choice
std::vector<std::string> supported_kernels();

// |x|^2, summed in order (used for key_aux).
float squared_norm(const float* x, int64_t dim);

// Entry points of the variants (defined in scan_<name>.cpp).
void scan_portable(const ScanArgs& args);
void scan_avx2(const ScanArgs& args);
void scan_avx_vnni(const ScanArgs& args);  // avx2 + AVX-VNNI (int8 keys by vpdpbusd)
void scan_avx512(const ScanArgs& args);
void scan_avx512dl(const ScanArgs& args);      // avx512 + AVX512_BF16 and AVX512_VNNI
void scan_neon(const ScanArgs& args);          // aarch64 Advanced SIMD
void scan_neon_dotprod(const ScanArgs& args);  // + the dot-product extension (sdot)
// Their selection loops (cpu/select_impl.hpp); the avx512_vnni_bf16, avx_vnni
// and neon_dotprod variants use those of avx512, avx2 and neon.
uint32_t kth_key_portable(const uint32_t*, int64_t, int64_t, uint32_t, uint32_t);
uint32_t kth_key_avx2(const uint32_t*, int64_t, int64_t, uint32_t, uint32_t);
uint32_t kth_key_avx512(const uint32_t*, int64_t, int64_t, uint32_t, uint32_t);
uint32_t kth_key_neon(const uint32_t*, int64_t, int64_t, uint32_t, uint32_t);
void rank_portable(const uint32_t*, const int32_t*, int64_t, int32_t*);
void rank_avx2(const uint32_t*, const int32_t*, int64_t, int32_t*);
void rank_avx512(const uint32_t*, const int32_t*, int64_t, int32_t*);
void rank_neon(const uint32_t*, const int32_t*, int64_t, int32_t*);
// Their row packs (cpu/pack_impl.hpp), shared the same way.
void pack_keys_portable(KeyFormat, const float*, int64_t, int64_t, int64_t, uint32_t*, float*,
                        int32_t*);
void pack_keys_avx2(KeyFormat, const float*, int64_t, int64_t, int64_t, uint32_t*, float*,
                    int32_t*);
void pack_keys_avx512(KeyFormat, const float*, int64_t, int64_t, int64_t, uint32_t*, float*,
                      int32_t*);
void pack_keys_neon(KeyFormat, const float*, int64_t, int64_t, int64_t, uint32_t*, float*,
                    int32_t*);
}  // namespace knnmem::cpu
