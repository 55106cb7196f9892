// CUDA kernels of knnmem: ring write, clear, and the fused search
// (tensor-core score tiles -> strided-bin reduction -> exact top-k of the bin
// winners -> gather). See knnmem_cuda.hpp for the contract and docs/cuda.md
// for the design.
//
// Search runs as two kernels on the caller's stream:
//   1. score_bins: a block per (memory, 64 queries, range of slots). It keeps
//      the 64 queries in shared memory, walks its slot range in tiles of 64
//      keys, computes the 64 x 64 score tile (WMMA bf16/fp16 -> fp32, or fp32
//      FMA), and folds the tile into per-(query, bin) best score and slot,
//      in shared memory when the bins fit, else in the global workspace.
//   2. select: a warp per (memory, query) merges the ranges bin by bin,
//      takes the exact top-k of the bin winners by k rounds of a warp-wide
//      arg-max, and gathers the keys and values of the winners.
// Ties: a bin keeps the first (lowest) slot among equal scores because each
// block scans its slots in ascending order and replaces only on a strictly
// greater score, and ranges are merged in ascending order the same way; the
// final order is (score desc, slot asc). That is the CPU core's rule, so the
// same rows come back up to the summation order of the dot products.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <stdexcept>
#include <string>

#include "cuda/knnmem_cuda.hpp"

namespace knnmem::cuda {
namespace {

constexpr int kTileQ = 64;                  // queries per score block
constexpr int kTileS = 64;                  // slots per score tile
constexpr int kThreads = 128;               // 4 warps
constexpr int kWarps = kThreads / 32;       //
constexpr int kScoreStride = kTileS + 4;    // floats per row of the score tile
constexpr int64_t kTargetBlocks = 528;      // ~4 blocks per SM of an H100 (132 SMs)
constexpr int64_t kMinSplitSlots = 1024;    // smallest slot range worth its own block
constexpr int64_t kSmemBudget = 200 << 10;  // bytes of shared memory a score block may ask for
constexpr float kNegInf = -INFINITY;

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("knnmem CUDA ") + what + ": " + cudaGetErrorString(err));
  }
}

void check_launch(const char* what) { check(cudaGetLastError(), what); }

// --- element types -----------------------------------------------------------
template <typename T>
struct Elem;
template <>
struct Elem<float> {
  static __device__ float to_float(float x) { return x; }
  static __device__ float from_float(float x) { return x; }
};
template <>
struct Elem<__nv_bfloat16> {
  static __device__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};
template <>
struct Elem<__half> {
  static __device__ float to_float(__half x) { return __half2float(x); }
  static __device__ __half from_float(float x) { return __float2half_rn(x); }
};

// Row stride (elements) of the query and key tiles in shared memory. The
// 16-bit tiles feed WMMA (ldm a multiple of 8, rows 32-byte aligned); the
// float32 tile is read one key per thread, so its stride is odd (no bank
// conflicts).
template <typename T>
__host__ __device__ constexpr int64_t padded_dim(int64_t dim) {
  return (dim + 15) / 16 * 16;
}
template <typename T>
__host__ __device__ constexpr int64_t query_stride(int64_t dim) {
  return sizeof(T) == 4 ? padded_dim<T>(dim) : padded_dim<T>(dim) + 8;
}
template <typename T>
__host__ __device__ constexpr int64_t key_stride(int64_t dim) {
  return sizeof(T) == 4 ? padded_dim<T>(dim) + 1 : padded_dim<T>(dim) + 8;
}

__host__ __device__ constexpr int64_t align128(int64_t bytes) { return (bytes + 127) / 128 * 128; }

// Shared-memory layout of a score block (byte offsets).
struct ScoreSmem {
  int64_t queries, keys, scores, query_sq, key_aux, key_off, bins, tiles_end, total;
};

template <typename T>
__host__ __device__ ScoreSmem score_smem(int64_t dim, int64_t bins, bool bins_in_smem) {
  ScoreSmem s{};
  s.queries = 0;
  s.keys = s.queries + align128(kTileQ * query_stride<T>(dim) * sizeof(T));
  s.scores = s.keys + align128(kTileS * key_stride<T>(dim) * sizeof(T));
  s.query_sq = s.scores + align128(kTileQ * kScoreStride * sizeof(float));
  s.key_aux = s.query_sq + align128(kTileQ * sizeof(float));
  s.key_off = s.key_aux + align128(kTileS * sizeof(float));
  s.bins = s.key_off + align128(kTileS * sizeof(int32_t));
  s.tiles_end = s.bins;
  s.total = bins_in_smem ? s.bins + kTileQ * bins * (sizeof(float) + sizeof(int32_t)) : s.bins;
  return s;
}

// --- per-memory state (read on the device: the host never sees `written`) ---
struct MemState {
  int64_t written;
  int64_t live;          // rows held
  int64_t end;           // slots [0, end) may hold rows
  int64_t masked_begin;  // slots below this are live; at or above, live iff offset < written
  bool exact;            // bins are stream offsets (one row each): exact top-k
};

__device__ int64_t load_written(const void* written, bool is_int32, int64_t g) {
  return is_int32 ? static_cast<int64_t>(static_cast<const int32_t*>(written)[g])
                  : static_cast<const int64_t*>(written)[g];
}

// Mirrors scan_range() and bins_for() of csrc/core/search.cpp.
__device__ MemState mem_state(int64_t written, int64_t capacity, int64_t num_bins) {
  MemState s;
  s.written = written;
  s.live = written < capacity ? written : capacity;
  if (written >= capacity) {
    s.end = s.masked_begin = capacity;
  } else {
    const int64_t block = Placement::kPlacementBlock;
    const int64_t full = written / block * block;
    s.end = written == full ? full : (capacity < full + block ? capacity : full + block);
    s.masked_begin = full;
  }
  s.exact = num_bins == 0 || num_bins >= s.live;
  return s;
}

// Score of a dot product under the metric, as the CPU kernels compute it.
// aux: 1/|k| (cosine) or |k|^2 (l2) of the key as stored.
__device__ float apply_metric(float dot, int metric, float query_sq, float aux) {
  if (metric == static_cast<int>(Metric::kCosine)) return dot * aux;
  if (metric == static_cast<int>(Metric::kL2)) return fminf(0.0f, 2.0f * dot - (query_sq + aux));
  return dot;
}

__device__ float aux_of(int metric, float sq) {
  if (metric == static_cast<int>(Metric::kCosine)) return sq > 0.0f ? 1.0f / sqrtf(sq) : 0.0f;
  return sq;
}

__device__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// --- score tiles ---------------------------------------------------------------
// scores[q][s] = <queries[q], keys[s]> for the 64 x 64 tile, fp32 accumulation.
template <typename T>
__device__ void score_tile(const T* queries, const T* keys, float* scores, int64_t dim) {
  if constexpr (sizeof(T) == 4) {
    // float32: 8 queries x 4 keys per thread.
    const int tid = threadIdx.x;
    const int ty = tid / 16, tx = tid % 16;
    const int64_t qs = query_stride<T>(dim), ks = key_stride<T>(dim);
    float acc[8][4] = {};
    for (int64_t c = 0; c < dim; ++c) {
      float a[8], b[4];
#pragma unroll
      for (int i = 0; i < 8; ++i) a[i] = queries[(ty * 8 + i) * qs + c];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = keys[(tx + 16 * j) * ks + c];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) scores[(ty * 8 + i) * kScoreStride + tx + 16 * j] = acc[i][j];
    }
  } else {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    // 16-bit inputs on tensor cores: each warp computes a 32 x 32 quarter.
    namespace wmma = nvcuda::wmma;
    const int warp = threadIdx.x / 32;
    const int row0 = (warp / 2) * 32, col0 = (warp % 2) * 32;
    const int64_t qs = query_stride<T>(dim), ks = key_stride<T>(dim);
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
    }
    const int64_t padded = padded_dim<T>(dim);
    for (int64_t c = 0; c < padded; c += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        wmma::load_matrix_sync(a[i], queries + (row0 + 16 * i) * qs + c, static_cast<unsigned>(qs));
        wmma::load_matrix_sync(b[i], keys + (col0 + 16 * i) * ks + c, static_cast<unsigned>(ks));
      }
#pragma unroll
      for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
      }
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        wmma::store_matrix_sync(scores + (row0 + 16 * i) * kScoreStride + col0 + 16 * j, acc[i][j],
                                kScoreStride, wmma::mem_row_major);
      }
    }
#else
    __trap();  // 16-bit key tiles need sm_80 or newer (bf16 WMMA)
#endif
  }
}

struct ScoreParams {
  const void* keys;
  const void* written;
  bool written_is_int32;
  const int32_t* offset_of;
  const float* queries;  // [G][num_queries][dim]
  int64_t grid, capacity, dim, num_queries;
  int64_t q_begin, q_count;  // this launch's chunk of queries
  int64_t num_bins;          // 0 = exact
  int64_t bins;              // per query in the workspace
  int64_t split_len;
  int metric;
  bool bins_in_smem;
  float* part_best;  // [splits][G][q_count][bins]
  int32_t* part_slot;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) score_bins_kernel(ScoreParams p) {
  extern __shared__ __align__(128) unsigned char smem[];
  const ScoreSmem layout = score_smem<T>(p.dim, p.bins, p.bins_in_smem);
  T* q_tile = reinterpret_cast<T*>(smem + layout.queries);
  T* k_tile = reinterpret_cast<T*>(smem + layout.keys);
  float* s_tile = reinterpret_cast<float*>(smem + layout.scores);
  float* q_sq = reinterpret_cast<float*>(smem + layout.query_sq);
  float* k_aux = reinterpret_cast<float*>(smem + layout.key_aux);
  int32_t* k_off = reinterpret_cast<int32_t*>(smem + layout.key_off);

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t q_tiles = (p.q_count + kTileQ - 1) / kTileQ;
  const int64_t g = blockIdx.x / q_tiles;
  const int64_t q0 = blockIdx.x % q_tiles * kTileQ;
  const int nq = static_cast<int>(p.q_count - q0 < kTileQ ? p.q_count - q0 : kTileQ);
  const int64_t split = blockIdx.y;
  const MemState st =
      mem_state(load_written(p.written, p.written_is_int32, g), p.capacity, p.num_bins);
  const int64_t L = p.bins;

  // Bin state of this block's queries: [nq][L] best score and slot.
  const int64_t part = ((split * p.grid + g) * p.q_count + q0) * L;
  float* bin_best;
  int32_t* bin_slot;
  if (p.bins_in_smem) {
    bin_best = reinterpret_cast<float*>(smem + layout.bins);
    bin_slot = reinterpret_cast<int32_t*>(bin_best + kTileQ * L);
  } else {
    bin_best = p.part_best + part;
    bin_slot = p.part_slot + part;
  }
  for (int64_t i = tid; i < nq * L; i += kThreads) {
    bin_best[i] = kNegInf;
    bin_slot[i] = -1;
  }

  // Queries, prepared as the CPU prepares them: |q|^2 of the float32 query,
  // unit length for cosine, then rounded to the key type.
  const int64_t qs = query_stride<T>(p.dim), ks = key_stride<T>(p.dim);
  const int64_t padded = padded_dim<T>(p.dim);
  for (int r = warp; r < kTileQ; r += kWarps) {
    const float* src = p.queries + ((g * p.num_queries) + p.q_begin + q0 + r) * p.dim;
    float sq = 0.0f;
    if (r < nq) {
      for (int64_t c = lane; c < p.dim; c += 32) sq += src[c] * src[c];
    }
    sq = warp_sum(sq);
    const float scale =
        p.metric == static_cast<int>(Metric::kCosine) && sq > 0.0f ? 1.0f / sqrtf(sq) : 1.0f;
    for (int64_t c = lane; c < qs; c += 32) {
      const float v = r < nq && c < p.dim ? src[c] * scale : 0.0f;
      q_tile[r * qs + c] = Elem<T>::from_float(v);
    }
    if (lane == 0) q_sq[r] = sq;
  }

  const int64_t s_begin = split * p.split_len;
  const int64_t s_end = st.end < s_begin + p.split_len ? st.end : s_begin + p.split_len;
  const T* keys = static_cast<const T*>(p.keys) + g * p.capacity * p.dim;
  // Lanes of a warp fold one query's scores into distinct bins at a time.
  const int width = st.exact || L >= 32 ? 32 : static_cast<int>(L);
  for (int64_t s0 = s_begin; s0 < s_end; s0 += kTileS) {
    const int ns = static_cast<int>(s_end - s0 < kTileS ? s_end - s0 : kTileS);
    __syncthreads();                               // the previous tile is consumed
    for (int r = warp; r < kTileS; r += kWarps) {  // a warp per key row: coalesced
      const T* src = keys + (s0 + r) * p.dim;
      for (int64_t c = lane; c < ks; c += 32) {
        k_tile[r * ks + c] = r < ns && c < p.dim ? src[c] : Elem<T>::from_float(0.0f);
      }
    }
    if (tid < kTileS) k_off[tid] = tid < ns ? p.offset_of[s0 + tid] : INT_MAX;
    __syncthreads();
    if (p.metric != static_cast<int>(Metric::kInnerProduct)) {
      for (int r = warp; r < kTileS; r += kWarps) {
        float sq = 0.0f;
        for (int64_t c = lane; c < padded; c += 32) {
          const float v = Elem<T>::to_float(k_tile[r * ks + c]);
          sq += v * v;
        }
        sq = warp_sum(sq);
        if (lane == 0) k_aux[r] = aux_of(p.metric, sq);
      }
    }
    score_tile<T>(q_tile, k_tile, s_tile, p.dim);
    __syncthreads();
    const int64_t bin0 = s0 % L;  // bin of the tile's first slot; no division per score
    for (int r = warp; r < nq; r += kWarps) {
      for (int j0 = 0; j0 < ns; j0 += width) {
        const int j = j0 + lane;
        if (lane < width && j < ns) {
          const int64_t s = s0 + j;
          if (s < st.masked_begin || k_off[j] < st.written) {
            const float v = apply_metric(s_tile[r * kScoreStride + j], p.metric, q_sq[r], k_aux[j]);
            int64_t bin = bin0 + j;  // (s0 + j) mod L, j < 64
            while (bin >= L) bin -= L;
            if (st.exact) bin = k_off[j];
            if (v > bin_best[r * L + bin]) {
              bin_best[r * L + bin] = v;
              bin_slot[r * L + bin] = static_cast<int32_t>(s);
            }
          }
        }
        __syncwarp();
      }
    }
  }
  if (p.bins_in_smem) {
    __syncthreads();
    for (int64_t i = tid; i < nq * L; i += kThreads) {
      p.part_best[part + i] = bin_best[i];
      p.part_slot[part + i] = bin_slot[i];
    }
  }
}

// --- selection -------------------------------------------------------------------
// One warp per (memory, query): merge the slot ranges bin by bin, then k rounds
// of a warp-wide arg-max over the bin winners, each round taking the best
// candidate after the previous pick in (score desc, slot asc) order (slots are
// distinct, so that order is total and nothing needs marking), then the gather.
struct Cand {
  float score;
  int32_t slot;  // -1: none
};

// a before b in (score desc, slot asc); an empty candidate is last.
__device__ bool before(Cand a, Cand b) {
  if (a.slot < 0) return false;
  if (b.slot < 0) return true;
  return a.score > b.score || (a.score == b.score && a.slot < b.slot);
}

__device__ Cand warp_best(Cand c) {
  for (int o = 16; o > 0; o >>= 1) {
    Cand other;
    other.score = __shfl_xor_sync(0xffffffffu, c.score, o);
    other.slot = __shfl_xor_sync(0xffffffffu, c.slot, o);
    if (before(other, c)) c = other;
  }
  return c;
}

__device__ int64_t warp_sum_int(int64_t v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

struct SelectParams {
  const void* keys;
  const float* values;
  const void* written;
  bool written_is_int32;
  const int32_t* offset_of;
  const float* queries;
  int64_t grid, capacity, dim, value_dim, num_queries;
  int64_t q_begin, q_count;
  int64_t k, num_bins, bins, splits;
  int metric;
  float* part_best;
  int32_t* part_slot;
  SearchOutput out;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) select_kernel(SelectParams p) {
  extern __shared__ __align__(16) float query_smem[];  // [warps][dim]: exact fallback
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t task = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (task >= p.grid * p.q_count) return;  // whole warps only; no block-wide syncs below
  float* query = query_smem + warp * p.dim;
  const int64_t g = task / p.q_count;
  const int64_t qi = task % p.q_count;
  const MemState st =
      mem_state(load_written(p.written, p.written_is_int32, g), p.capacity, p.num_bins);
  const int64_t owed = p.k < st.live ? p.k : st.live;
  const int64_t L = p.bins;
  float* best = p.part_best + (g * p.q_count + qi) * L;
  int32_t* slot = p.part_slot + (g * p.q_count + qi) * L;
  const int64_t split_stride = p.grid * p.q_count * L;

  // Merge the slot ranges bin by bin (ascending ranges: ties keep the lower slot).
  int64_t filled = 0;
  for (int64_t b = lane; b < L; b += 32) {
    float v = best[b];
    int32_t s = slot[b];
    for (int64_t r = 1; r < p.splits; ++r) {
      const float w = best[b + r * split_stride];
      if (w > v) {
        v = w;
        s = slot[b + r * split_stride];
      }
    }
    best[b] = v;
    slot[b] = s;
    filled += s >= 0;
  }
  const int64_t nonempty = warp_sum_int(filled);
  __syncwarp();  // merged bins visible to the whole warp
  // Bins over physical slots of a memory that is not full can be empty; then,
  // as on the CPU, only an exact search returns every row the caller is owed.
  const bool fallback = !st.exact && nonempty < owed;

  const int64_t row = g * p.num_queries + p.q_begin + qi;
  const T* keys = static_cast<const T*>(p.keys) + g * p.capacity * p.dim;
  float query_sq = 0.0f;
  if (fallback) {  // the query prepared as in the score kernel
    const float* src = p.queries + row * p.dim;
    float sq = 0.0f;
    for (int64_t c = lane; c < p.dim; c += 32) sq += src[c] * src[c];
    query_sq = warp_sum(sq);
    const float scale = p.metric == static_cast<int>(Metric::kCosine) && query_sq > 0.0f
                            ? 1.0f / sqrtf(query_sq)
                            : 1.0f;
    for (int64_t c = lane; c < p.dim; c += 32) {
      query[c] = Elem<T>::to_float(Elem<T>::from_float(src[c] * scale));
    }
    __syncwarp();
  }

  Cand prev{INFINITY, -1};  // the last pick; the next is the best candidate after it
  auto after_prev = [&](Cand c) {
    return prev.slot < 0 || c.score < prev.score || (c.score == prev.score && c.slot > prev.slot);
  };
  int64_t found = 0;
  for (; found < p.k; ++found) {
    Cand mine{kNegInf, -1};
    if (!fallback) {
      for (int64_t b = lane; b < L; b += 32) {
        const Cand c{best[b], slot[b]};
        if (c.slot >= 0 && after_prev(c) && before(c, mine)) mine = c;
      }
    } else {  // slow but rare: a sparse memory; scores recomputed each round
      for (int64_t s = lane; s < st.end; s += 32) {
        if (s >= st.masked_begin && p.offset_of[s] >= st.written) continue;
        float dot = 0.0f, sq = 0.0f;
        for (int64_t c = 0; c < p.dim; ++c) {
          const float kv = Elem<T>::to_float(keys[s * p.dim + c]);
          dot = fmaf(query[c], kv, dot);
          sq = fmaf(kv, kv, sq);
        }
        const Cand c{apply_metric(dot, p.metric, query_sq, aux_of(p.metric, sq)),
                     static_cast<int32_t>(s)};
        if (after_prev(c) && before(c, mine)) mine = c;
      }
    }
    const Cand pick = warp_best(mine);
    if (pick.slot < 0) break;
    const int64_t o = row * p.k + found;
    if (lane == 0) {
      const int64_t r = p.offset_of[pick.slot];
      const int64_t pos = r + p.capacity * ((st.written - 1 - r) / p.capacity);
      p.out.scores[o] = pick.score;
      p.out.mask[o] = true;
      if (p.written_is_int32) {
        static_cast<int32_t*>(p.out.indices)[o] = static_cast<int32_t>(pos);
      } else {
        static_cast<int64_t*>(p.out.indices)[o] = pos;
      }
    }
    if (p.out.keys) {
      for (int64_t c = lane; c < p.dim; c += 32) {
        p.out.keys[o * p.dim + c] = Elem<T>::to_float(keys[pick.slot * p.dim + c]);
      }
    }
    if (p.out.values) {
      const float* v = p.values + (g * p.capacity + pick.slot) * p.value_dim;
      for (int64_t c = lane; c < p.value_dim; c += 32) p.out.values[o * p.value_dim + c] = v[c];
    }
    prev = pick;
  }
  for (int64_t j = found; j < p.k; ++j) {
    const int64_t o = row * p.k + j;
    if (lane == 0) {
      p.out.scores[o] = kNegInf;
      p.out.mask[o] = false;
      if (p.written_is_int32) {
        static_cast<int32_t*>(p.out.indices)[o] = -1;
      } else {
        static_cast<int64_t*>(p.out.indices)[o] = -1;
      }
    }
    if (p.out.keys) {
      for (int64_t c = lane; c < p.dim; c += 32) p.out.keys[o * p.dim + c] = 0.0f;
    }
    if (p.out.values) {
      for (int64_t c = lane; c < p.value_dim; c += 32) p.out.values[o * p.value_dim + c] = 0.0f;
    }
  }
}

// --- add / clear -----------------------------------------------------------------
template <typename T>
__global__ void add_kernel(T* keys, float* values, const int64_t* written, const int32_t* slot_of,
                           int64_t grid, int64_t capacity, int64_t dim, int64_t value_dim,
                           const float* new_keys, const float* new_values, int64_t num_rows,
                           int64_t first) {
  const int64_t rows = num_rows - first;  // rows stored per memory (distinct slots)
  for (int64_t i = blockIdx.x; i < grid * rows; i += gridDim.x) {
    const int64_t g = i / rows, t = first + i % rows;
    const int64_t slot = slot_of[(written[g] + t) % capacity];
    const float* src_k = new_keys + (g * num_rows + t) * dim;
    const float* src_v = new_values + (g * num_rows + t) * value_dim;
    T* dst_k = keys + (g * capacity + slot) * dim;
    float* dst_v = values + (g * capacity + slot) * value_dim;
    for (int64_t c = threadIdx.x; c < dim; c += blockDim.x)
      dst_k[c] = Elem<T>::from_float(src_k[c]);
    for (int64_t c = threadIdx.x; c < value_dim; c += blockDim.x) dst_v[c] = src_v[c];
  }
}

__global__ void advance_kernel(int64_t* written, int64_t grid, int64_t num_rows) {
  for (int64_t g = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; g < grid;
       g += int64_t{gridDim.x} * blockDim.x) {
    written[g] += num_rows;
  }
}

__global__ void clear_kernel(int64_t* written, const bool* mask, int64_t grid) {
  for (int64_t g = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; g < grid;
       g += int64_t{gridDim.x} * blockDim.x) {
    if (mask == nullptr || mask[g]) written[g] = 0;
  }
}

unsigned blocks_for(int64_t n, int64_t per_block) {
  const int64_t b = (n + per_block - 1) / per_block;
  return static_cast<unsigned>(std::clamp<int64_t>(b, 1, 65535));
}

template <typename T>
int64_t smem_for_tiles(int64_t dim) {
  return score_smem<T>(dim, 0, false).total;
}

int64_t tiles_bytes(int64_t dim, KeyDType dtype) {
  return dtype == KeyDType::kFloat32 ? smem_for_tiles<float>(dim)
                                     : smem_for_tiles<__half>(dim);  // bf16 and fp16: same size
}

int device_smem_optin() {
  int device = 0, bytes = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 48 << 10;
  if (cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) !=
      cudaSuccess) {
    return 48 << 10;
  }
  return bytes;
}

template <typename T>
void launch_search(const RingView& ring, const float* queries, int64_t num_queries, int64_t k,
                   Metric metric, const SearchPlan& plan, void* workspace, const SearchOutput& out,
                   cudaStream_t stream) {
  const int64_t smem_limit = std::min<int64_t>(device_smem_optin(), kSmemBudget);
  const int64_t with_bins = score_smem<T>(ring.key_dim, plan.bins, true).total;
  const bool bins_in_smem = with_bins <= smem_limit;
  const int64_t smem = bins_in_smem ? with_bins : smem_for_tiles<T>(ring.key_dim);
  if (smem > smem_limit) {
    throw InvalidArgument("key_dim: " + std::to_string(ring.key_dim) +
                          " is too large for the CUDA search kernel on this device (" +
                          std::to_string(smem) + " bytes of shared memory, " +
                          std::to_string(smem_limit) + " available)");
  }
  check(cudaFuncSetAttribute(score_bins_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(smem)),
        "score kernel attributes");
  const int64_t part_elems = plan.splits * ring.grid * plan.query_chunk * plan.bins;
  float* part_best = static_cast<float*>(workspace);
  int32_t* part_slot = reinterpret_cast<int32_t*>(part_best + part_elems);

  for (int64_t q_begin = 0; q_begin < num_queries; q_begin += plan.query_chunk) {
    const int64_t q_count = std::min(plan.query_chunk, num_queries - q_begin);
    ScoreParams sp{};
    sp.keys = ring.keys;
    sp.written = ring.written;
    sp.written_is_int32 = ring.written_is_int32;
    sp.offset_of = ring.offset_of;
    sp.queries = queries;
    sp.grid = ring.grid;
    sp.capacity = ring.capacity;
    sp.dim = ring.key_dim;
    sp.num_queries = num_queries;
    sp.q_begin = q_begin;
    sp.q_count = q_count;
    sp.num_bins = plan.num_bins;
    sp.bins = plan.bins;
    sp.split_len = plan.split_len;
    sp.metric = static_cast<int>(metric);
    sp.bins_in_smem = bins_in_smem;
    sp.part_best = part_best;
    sp.part_slot = part_slot;
    const int64_t q_tiles = (q_count + kTileQ - 1) / kTileQ;
    const dim3 score_grid(static_cast<unsigned>(ring.grid * q_tiles),
                          static_cast<unsigned>(plan.splits));
    score_bins_kernel<T><<<score_grid, kThreads, smem, stream>>>(sp);
    check_launch("search (score kernel)");

    SelectParams sel{};
    sel.keys = ring.keys;
    sel.values = ring.values;
    sel.written = ring.written;
    sel.written_is_int32 = ring.written_is_int32;
    sel.offset_of = ring.offset_of;
    sel.queries = queries;
    sel.grid = ring.grid;
    sel.capacity = ring.capacity;
    sel.dim = ring.key_dim;
    sel.value_dim = ring.value_dim;
    sel.num_queries = num_queries;
    sel.q_begin = q_begin;
    sel.q_count = q_count;
    sel.k = k;
    sel.num_bins = plan.num_bins;
    sel.bins = plan.bins;
    sel.splits = plan.splits;
    sel.metric = static_cast<int>(metric);
    sel.part_best = part_best;
    sel.part_slot = part_slot;
    sel.out = out;
    const size_t select_smem = sizeof(float) * kWarps * static_cast<size_t>(ring.key_dim);
    if (select_smem > (48u << 10)) {
      check(cudaFuncSetAttribute(select_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 static_cast<int>(select_smem)),
            "select kernel attributes");
    }
    const int64_t select_blocks = (ring.grid * q_count + kWarps - 1) / kWarps;
    select_kernel<T><<<static_cast<unsigned>(select_blocks), kThreads, select_smem, stream>>>(sel);
    check_launch("search (select kernel)");
  }
}

}  // namespace

KeyDType parse_key_dtype(const std::string& name) {
  if (name == "float32") return KeyDType::kFloat32;
  if (name == "bfloat16") return KeyDType::kBFloat16;
  if (name == "float16") return KeyDType::kFloat16;
  throw InvalidArgument("dtype: expected 'float32', 'bfloat16' or 'float16', got '" + name + "'");
}

const char* key_dtype_name(KeyDType dtype) {
  switch (dtype) {
    case KeyDType::kBFloat16:
      return "bfloat16";
    case KeyDType::kFloat16:
      return "float16";
    default:
      return "float32";
  }
}

int64_t key_dtype_size(KeyDType dtype) { return dtype == KeyDType::kFloat32 ? 4 : 2; }

int64_t bins_for_search(int64_t k, double recall_target, KeyDType dtype) {
  const KeyFormat format = dtype == KeyDType::kFloat32    ? KeyFormat::kFloat32
                           : dtype == KeyDType::kBFloat16 ? KeyFormat::kBFloat16
                                                          : KeyFormat::kFloat16;
  return knnmem::bins_for_search(k, recall_target, format);
}

SearchPlan plan_search(int64_t grid, int64_t capacity, int64_t key_dim, int64_t num_queries,
                       int64_t k, double recall_target, KeyDType dtype, int64_t workspace_limit) {
  if (k < 1 || k > capacity) {
    throw InvalidArgument("k: expected an integer in [1, capacity=" + std::to_string(capacity) +
                          "], got " + std::to_string(k));
  }
  if (!(recall_target > 0.0 && recall_target <= 1.0)) {
    throw InvalidArgument("recall_target: expected a number in (0, 1], got " +
                          std::to_string(recall_target));
  }
  if (tiles_bytes(key_dim, dtype) > kSmemBudget) {
    throw InvalidArgument("key_dim: " + std::to_string(key_dim) +
                          " is too large for the CUDA search kernel (its query and key tiles "
                          "need more than " +
                          std::to_string(kSmemBudget) + " bytes of shared memory)");
  }
  SearchPlan plan;
  plan.num_bins = bins_for_search(k, recall_target, dtype);
  // Exact search (and bins >= rows held) bins rows by stream offset, < capacity.
  plan.bins = plan.num_bins == 0 ? capacity : std::min(plan.num_bins, capacity);
  plan.query_chunk = std::max<int64_t>(num_queries, 1);
  for (;;) {
    const int64_t q_tiles = (plan.query_chunk + kTileQ - 1) / kTileQ;
    const int64_t blocks = std::max<int64_t>(1, grid * q_tiles);
    int64_t splits = 1;
    if (plan.num_bins != 0) {  // exact mode keeps one bin per slot: one range
      splits = std::clamp<int64_t>((kTargetBlocks + blocks - 1) / blocks, 1,
                                   std::max<int64_t>(1, capacity / kMinSplitSlots));
      splits = std::min<int64_t>(splits, 65535);
    }
    const int64_t per = (capacity + splits - 1) / splits;
    plan.split_len = (per + kTileS - 1) / kTileS * kTileS;
    plan.splits = (capacity + plan.split_len - 1) / plan.split_len;
    plan.workspace_bytes =
        plan.splits * grid * plan.query_chunk * plan.bins * (sizeof(float) + sizeof(int32_t));
    if (plan.workspace_bytes <= workspace_limit || plan.query_chunk <= kTileQ) break;
    plan.query_chunk =
        std::max<int64_t>(kTileQ, (plan.query_chunk / 2 + kTileQ - 1) / kTileQ * kTileQ);
  }
  return plan;
}

void search(const RingView& ring, const float* queries, int64_t num_queries, int64_t k,
            Metric metric, const SearchPlan& plan, void* workspace, const SearchOutput& out,
            void* stream) {
  if (num_queries == 0 || ring.grid == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  switch (ring.key_dtype) {
    case KeyDType::kBFloat16:
      launch_search<__nv_bfloat16>(ring, queries, num_queries, k, metric, plan, workspace, out, s);
      break;
    case KeyDType::kFloat16:
      launch_search<__half>(ring, queries, num_queries, k, metric, plan, workspace, out, s);
      break;
    default:
      launch_search<float>(ring, queries, num_queries, k, metric, plan, workspace, out, s);
  }
}

void add(void* keys, KeyDType dtype, float* values, int64_t* written, const int32_t* slot_of,
         int64_t grid, int64_t capacity, int64_t key_dim, int64_t value_dim, const float* new_keys,
         const float* new_values, int64_t num_rows, void* stream) {
  if (num_rows == 0 || grid == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  const int64_t first = std::max<int64_t>(0, num_rows - capacity);
  const unsigned blocks = blocks_for(grid * (num_rows - first), 1);
  const unsigned threads = 128;
  switch (dtype) {
    case KeyDType::kBFloat16:
      add_kernel<__nv_bfloat16><<<blocks, threads, 0, s>>>(
          static_cast<__nv_bfloat16*>(keys), values, written, slot_of, grid, capacity, key_dim,
          value_dim, new_keys, new_values, num_rows, first);
      break;
    case KeyDType::kFloat16:
      add_kernel<__half><<<blocks, threads, 0, s>>>(static_cast<__half*>(keys), values, written,
                                                    slot_of, grid, capacity, key_dim, value_dim,
                                                    new_keys, new_values, num_rows, first);
      break;
    default:
      add_kernel<float><<<blocks, threads, 0, s>>>(static_cast<float*>(keys), values, written,
                                                   slot_of, grid, capacity, key_dim, value_dim,
                                                   new_keys, new_values, num_rows, first);
  }
  check_launch("add");
  // Stream order: the counters move only after every row has read them.
  advance_kernel<<<blocks_for(grid, 256), 256, 0, s>>>(written, grid, num_rows);
  check_launch("add (counters)");
}

void clear(int64_t* written, const bool* mask, int64_t grid, void* stream) {
  if (grid == 0) return;
  clear_kernel<<<blocks_for(grid, 256), 256, 0, static_cast<cudaStream_t>(stream)>>>(written, mask,
                                                                                     grid);
  check_launch("clear");
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return 0;
  }
  return n;
}

std::string device_status() {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
  }
  return n == 0 ? "no CUDA device found" : "";
}

}  // namespace knnmem::cuda
