// CUDA kernels of knnmem: ring write, clear, and the fused search
// (tensor-core score tiles -> strided-bin reduction -> exact top-k of the bin
// winners -> gather). See knnmem_cuda.hpp for the contract and docs/cuda.md
// for the design.
//
// Search runs as three kernels on the caller's stream:
//   1. score_bins: a block per (memory, 64 or 128 queries, 64 bins, range of
//      rounds). Bins are the columns of the product: bin b of round r is slot
//      r L + b, so each round's 64 keys give every query one score per bin and
//      the max over rounds stays in the registers of the product
//      (mma.sync m16n8k16 bf16/fp16 -> fp32, or fp32 FMA); cp.async brings
//      the key tiles in. Exact searches scatter each row's score to its bin.
//   2. select: a warp per (memory, query) merges the ranges bin by bin and
//      takes the exact top-k of the bin winners (64-bit candidate keys).
//   3. gather: a thread per 4 elements of a result row copies keys and values.
// Ties: a bin keeps the first (lowest) slot among equal scores because rounds
// are scanned in ascending order and a bin is replaced only on a strictly
// greater score, and ranges are merged in ascending order the same way; the
// final order is (score desc, slot asc). That is the CPU core's rule, so the
// same rows come back up to the summation order of the dot products.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#if defined(KNNMEM_CUDA_EMU)
#include <mma.h>  // tests/cuda_emu: emu::mma_16816
#endif

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "cuda/knnmem_cuda.hpp"

namespace knnmem::cuda {
namespace {

constexpr int kTileQ = 128;    // queries per score block, at most (query chunks are multiples)
constexpr int kTileS = 64;     // keys (bins) per score tile
constexpr int kMaxStages = 4;  // key tiles in flight per score block
constexpr int kThreads = 128;  // select block: 4 warps, one query each
constexpr int kWarps = kThreads / 32;       //
constexpr int64_t kTargetBlocks = 1056;     // ~2 waves of 4 blocks per SM of an H100 (132 SMs)
constexpr int64_t kMinSplitRounds = 4;      // fewest rounds of the bins a block scans
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

// Row strides (elements) of the query and key tiles in shared memory. 16-bit
// tiles are read as 32-bit words by the mma.sync fragment loads: a row stride
// of 8 (mod 16) words puts the 8 rows x 4 words of a fragment in 32 distinct
// banks. float32 tiles are read as float4 along the key dimension by 8 threads
// at a time, so a stride of 4 (mod 8) words keeps those reads conflict-free.
// Every row is 16-byte aligned (cp.async).
template <typename T>
__host__ __device__ constexpr int64_t padded_dim(int64_t dim) {
  return (dim + 15) / 16 * 16;
}
template <typename T>
__host__ __device__ constexpr int64_t tile_stride(int64_t dim) {
  return sizeof(T) == 4 ? padded_dim<T>(dim) + 4 : padded_dim<T>(dim) + 8;
}

__host__ __device__ constexpr int64_t align128(int64_t bytes) { return (bytes + 127) / 128 * 128; }

// Shared-memory layout of a score block (byte offsets): the prepared queries,
// `stages` key tiles (double-buffered when they fit), and per key tile the
// column's norm term, mask bias (0 or -inf) and stream offset.
struct ScoreSmem {
  int64_t queries, keys, key_bytes, query_sq, key_aux, key_bias, key_off, total;
};

template <typename T>
__host__ __device__ ScoreSmem score_smem(int64_t dim, int stages, int64_t query_tile) {
  ScoreSmem s{};
  s.queries = 0;
  s.key_bytes = align128(kTileS * tile_stride<T>(dim) * sizeof(T));
  s.keys = s.queries + align128(query_tile * tile_stride<T>(dim) * sizeof(T));
  s.query_sq = s.keys + stages * s.key_bytes;
  s.key_aux = s.query_sq + align128(query_tile * sizeof(float));
  s.key_bias = s.key_aux + align128(kMaxStages * kTileS * sizeof(float));
  s.key_off = s.key_bias + align128(kMaxStages * kTileS * sizeof(float));
  s.total = s.key_off + align128(kMaxStages * kTileS * sizeof(int32_t));
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
__device__ __forceinline__ float apply_metric(float dot, int metric, float query_sq, float aux) {
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

// --- asynchronous copies and tensor-core products ---------------------------------
// cp.async (sm_80+) copies 16 bytes global -> shared without registers; the
// emulation (tests/cuda_emu) copies at once.
__device__ __forceinline__ void copy16_async(void* dst, const void* src) {
#if defined(KNNMEM_CUDA_EMU) || !defined(__CUDA_ARCH__)
  std::memcpy(dst, src, 16);
#else
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(src));
#endif
}
__device__ __forceinline__ void copy_commit() {
#if !defined(KNNMEM_CUDA_EMU) && defined(__CUDA_ARCH__)
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int Pending>
__device__ __forceinline__ void copy_wait() {
#if !defined(KNNMEM_CUDA_EMU) && defined(__CUDA_ARCH__)
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending));
#endif
}
// Waits until at most `pending` of this thread's newest copy groups are in flight.
__device__ __forceinline__ void copy_wait_for(int pending) {
  switch (pending) {
    case 0:
      copy_wait<0>();
      break;
    case 1:
      copy_wait<1>();
      break;
    case 2:
      copy_wait<2>();
      break;
    default:
      copy_wait<3>();
  }
}

// d += a (16x16, row) * b (16x8, col), bf16/fp16 inputs, fp32 accumulation
// (mma.sync.m16n8k16). Fragments as the PTX ISA lays them out: with
// g = lane / 4 and t = lane % 4, a holds A[g][2t..], A[g+8][2t..],
// A[g][2t+8..], A[g+8][2t+8..]; b holds B[2t..][g], B[2t+8..][g]; d holds
// D[g][2t], D[g][2t+1], D[g+8][2t], D[g+8][2t+1].
template <typename T>
__device__ __forceinline__ void mma_16816(float& d0, float& d1, float& d2, float& d3,
                                          const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(KNNMEM_CUDA_EMU)
  ::emu::mma_16816<T>(d0, d1, d2, d3, a, b0, b1);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d0), "+f"(d1), "+f"(d2), "+f"(d3)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d0), "+f"(d1), "+f"(d2), "+f"(d3)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#else
  __trap();  // 16-bit key tiles need sm_80 or newer
#endif
}

// --- the score kernel ----------------------------------------------------------
// A block of 128 threads per (memory, 64 queries, 64 bins, range of rounds).
// Bins as columns: bin b of round r is slot r * L + b, so the 64 x 64 product
// of the queries with the keys of slots [r L + b0, r L + b0 + 64) gives every
// query one score per bin, and the running max over rounds stays in the
// registers that hold the product: each thread keeps, per accumulator
// element, the best score and the round it came from -- no score tile, no bin
// state in memory. Key tiles stream in with cp.async, double-buffered.
// A memory searched exactly (bins are stream offsets: L >= rows held, or
// recall_target 1) walks its slots in tiles of 64 instead, shared among all the
// memory's blocks, and writes each row's score to the bin of its offset.
//
// Each thread's 32 accumulator elements: for 16-bit keys, warp w holds rows
// 32 (w / 2) .. +32 and columns 32 (w % 2) .. +32 as 2 x 4 m16n8 tiles; for
// float32, thread t holds rows 8 (t / 16) .. +8 and columns t % 16 + 16 j.
constexpr int kAcc = 32;

template <typename T>
__device__ __forceinline__ int acc_row(int e) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if constexpr (sizeof(T) == 4) {
    return static_cast<int>(threadIdx.x / 16) * 8 + e / 4;
  } else {
    return (warp / 2) * 32 + (e / 16) * 16 + lane / 4 + ((e & 2) ? 8 : 0);
  }
}
template <typename T>
__device__ __forceinline__ int acc_col(int e) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if constexpr (sizeof(T) == 4) {
    return static_cast<int>(threadIdx.x % 16) + 16 * (e % 4);
  } else {
    return (warp % 2) * 32 + ((e / 4) % 4) * 8 + (lane % 4) * 2 + (e & 1);
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
  int64_t bins;              // L: bins per query in the workspace
  int64_t bin_tiles;         // ceil(L / 64)
  int64_t split_rounds;      // rounds per split
  int metric;
  int stages;        // key tiles in flight: 1 .. kMaxStages
  bool vec_loads;    // keys copied 16 bytes at a time (aligned rows)
  float* part_best;  // [splits][G][q_count][bins]
  int32_t* part_slot;
};

// 32 accumulators: scores of the block's 64 queries with the tile's 64 keys.
// KS > 0: 16-bit keys with padded_dim == 16 KS, query fragments in registers.
template <typename T, int KS>
__device__ __forceinline__ void tile_product(const T* q_tile, const T* k_tile, int64_t dim,
                                             const uint32_t (&a_reg)[KS > 0 ? KS : 1][2][4],
                                             float (&acc)[kAcc]) {
#pragma unroll
  for (int e = 0; e < kAcc; ++e) acc[e] = 0.0f;
  const int64_t stride = tile_stride<T>(dim);
  if constexpr (sizeof(T) == 4) {
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    const int64_t padded = padded_dim<T>(dim);
    for (int64_t c = 0; c < padded; c += 4) {
      float4 a[8], b[4];
#pragma unroll
      for (int i = 0; i < 8; ++i)
        a[i] = *reinterpret_cast<const float4*>(q_tile + (ty * 8 + i) * stride + c);
#pragma unroll
      for (int j = 0; j < 4; ++j)
        b[j] = *reinterpret_cast<const float4*>(k_tile + (tx + 16 * j) * stride + c);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          float v = acc[i * 4 + j];
          v = fmaf(a[i].x, b[j].x, v);
          v = fmaf(a[i].y, b[j].y, v);
          v = fmaf(a[i].z, b[j].z, v);
          acc[i * 4 + j] = fmaf(a[i].w, b[j].w, v);
        }
      }
    }
  } else {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int g = lane / 4, t = lane % 4;
    const int64_t words = stride / 2;  // 32-bit words per tile row
    const uint32_t* qw =
        reinterpret_cast<const uint32_t*>(q_tile) + ((warp / 2) * 32 + g) * words + t;
    const uint32_t* kw =
        reinterpret_cast<const uint32_t*>(k_tile) + ((warp % 2) * 32 + g) * words + t;
    auto step = [&](int s, const uint32_t (&a)[2][4]) {
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) {
        const uint32_t* base = kw + ni * 8 * words + s * 8;
        const uint32_t b0 = base[0], b1 = base[4];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
          float* d = acc + (mi * 4 + ni) * 4;
          mma_16816<T>(d[0], d[1], d[2], d[3], a[mi], b0, b1);
        }
      }
    };
    if constexpr (KS > 0) {
#pragma unroll
      for (int s = 0; s < KS; ++s) step(s, a_reg[s]);
    } else {
      const int steps = static_cast<int>(padded_dim<T>(dim) / 16);
      for (int s = 0; s < steps; ++s) {
        uint32_t a[2][4];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
          const uint32_t* base = qw + mi * 16 * words + s * 8;
          a[mi][0] = base[0];
          a[mi][1] = base[8 * words];
          a[mi][2] = base[4];
          a[mi][3] = base[8 * words + 4];
        }
        step(s, a);
      }
    }
  }
}

// WM: warps along the queries; a block is 64 WM threads over a 32 WM x 64 tile.
// The kernel is latency-bound at its low occupancy (ncu on an H200: 2 warps per
// scheduler, IPC 1.25): for small 16-bit key_dim, asking for 3 blocks per SM
// (<= 168 registers, a few spilled) ran M2 18% faster; for float32 and larger
// key_dim it did not help.
template <typename T, int KS, int WM>
__global__ void __launch_bounds__(64 * WM, KS > 0 && WM == 2 ? 3 : 1)
    score_bins_kernel(ScoreParams p) {
  constexpr int QT = 32 * WM, NT = 64 * WM;
  extern __shared__ __align__(128) unsigned char smem[];
  const ScoreSmem layout = score_smem<T>(p.dim, p.stages, QT);
  T* q_tile = reinterpret_cast<T*>(smem + layout.queries);
  float* q_sq = reinterpret_cast<float*>(smem + layout.query_sq);
  float* k_aux = reinterpret_cast<float*>(smem + layout.key_aux);    // [2][64]
  float* k_bias = reinterpret_cast<float*>(smem + layout.key_bias);  // [2][64]
  int32_t* k_off = reinterpret_cast<int32_t*>(smem + layout.key_off);
  auto key_tile = [&](int buf) {
    return reinterpret_cast<T*>(smem + layout.keys + buf * layout.key_bytes);
  };

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t q_tiles = (p.q_count + QT - 1) / QT;
  const int64_t g = blockIdx.x / q_tiles;
  const int64_t q0 = blockIdx.x % q_tiles * QT;
  const int nq = static_cast<int>(p.q_count - q0 < QT ? p.q_count - q0 : QT);
  const int64_t bt = blockIdx.y, split = blockIdx.z;
  const MemState st =
      mem_state(load_written(p.written, p.written_is_int32, g), p.capacity, p.num_bins);
  const int64_t L = p.bins, b0 = bt * kTileS;
  const int64_t stride = tile_stride<T>(p.dim);
  const bool ip = p.metric == static_cast<int>(Metric::kInnerProduct);

  // Key tiles start zeroed: columns past dim stay zero, the loads never write them.
  for (int64_t i = tid; i < p.stages * layout.key_bytes / 4; i += NT) {
    reinterpret_cast<uint32_t*>(smem + layout.keys)[i] = 0;
  }
  // Queries, prepared as the CPU prepares them: |q|^2 of the float32 query,
  // unit length for cosine, then rounded to the key type.
  for (int r = warp; r < QT; r += NT / 32) {
    const float* src = p.queries + ((g * p.num_queries) + p.q_begin + q0 + r) * p.dim;
    float sq = 0.0f;
    if (r < nq) {
      for (int64_t c = lane; c < p.dim; c += 32) sq += src[c] * src[c];
    }
    sq = warp_sum(sq);
    const float scale =
        p.metric == static_cast<int>(Metric::kCosine) && sq > 0.0f ? 1.0f / sqrtf(sq) : 1.0f;
    for (int64_t c = lane; c < stride; c += 32) {
      const float v = r < nq && c < p.dim ? src[c] * scale : 0.0f;
      q_tile[r * stride + c] = Elem<T>::from_float(v);
    }
    if (lane == 0) q_sq[r] = sq;
  }

  // The block's tiles of 64 keys. Binned: rounds [r_begin, r_end) of its bins;
  // column c of round r is slot r L + b0 + c. Exact: the memory's slot tiles
  // j, j + nj, ... of 64 slots each.
  const int64_t blocks_per_memory = p.bin_tiles * gridDim.z;
  const int64_t j = split * p.bin_tiles + bt;
  int64_t first, count, step;
  if (st.exact) {
    const int64_t slot_tiles = (st.end + kTileS - 1) / kTileS;
    first = j;
    step = blocks_per_memory;
    count = first < slot_tiles ? (slot_tiles - first + step - 1) / step : 0;
  } else {
    const int64_t rounds = (st.end + L - 1) / L;
    first = split * p.split_rounds;
    step = 1;
    const int64_t last = first + p.split_rounds < rounds ? first + p.split_rounds : rounds;
    count = last > first ? last - first : 0;
  }
  const int64_t cols = st.exact ? kTileS : (L - b0 < kTileS ? L - b0 : kTileS);
  auto slot_of_col = [&](int64_t item, int64_t c) {
    return st.exact ? item * kTileS + c : item * L + b0 + c;
  };
  // Starts the copy of tile `item` into buffer `buf`: keys (zeros for columns
  // that hold no row), and each column's mask bias and stream offset.
  // A thread copies parts i = tid, tid + NT, ... of the tile's 64 rows (16-byte
  // chunks, or elements); the (row, part) of each is stepped, not divided.
  constexpr int per16 = 16 / sizeof(T);
  const int row_parts = static_cast<int>(p.vec_loads ? p.dim / per16 : p.dim);
  const int part_width = p.vec_loads ? per16 : 1;
  const int c_first = tid / row_parts, part_first = tid % row_parts;
  const int c_step = NT / row_parts, part_step = NT % row_parts;
  const T* memory_keys = static_cast<const T*>(p.keys) + g * p.capacity * p.dim;
  auto load = [&](int64_t item, int buf) {
    T* dst = key_tile(buf);
    const int64_t s0 = slot_of_col(item, 0);  // column c holds slot s0 + c
    for (int c = c_first, part = part_first; c < kTileS;) {
      const int64_t s = s0 + c;
      T* d = dst + c * stride + part * part_width;
      const bool has_row = c < cols && s < st.end;
      if (p.vec_loads) {
        if (has_row) {
          copy16_async(d, memory_keys + s * p.dim + part * per16);
        } else {
          *reinterpret_cast<uint4*>(d) = make_uint4(0, 0, 0, 0);
        }
      } else {
        *d = has_row ? memory_keys[s * p.dim + part] : Elem<T>::from_float(0.0f);
      }
      c += c_step;
      part += part_step;
      if (part >= row_parts) {
        part -= row_parts;
        ++c;
      }
    }
    copy_commit();
    if (tid < kTileS) {  // offsets are read only where needed: a load's latency per tile
      const int64_t s = slot_of_col(item, tid);
      const bool in_range = tid < cols && s < st.end;
      const bool need_off = in_range && (st.exact || s >= st.masked_begin);
      const int32_t off = need_off ? p.offset_of[s] : INT_MAX;
      const bool live = in_range && (s < st.masked_begin || off < st.written);
      k_bias[buf * kTileS + tid] = live ? 0.0f : kNegInf;
      k_off[buf * kTileS + tid] = off;
    }
  };

  // Query fragments held in registers across all tiles (16-bit, small dim).
  uint32_t a_reg[KS > 0 ? KS : 1][2][4];
  __syncthreads();
  if constexpr (KS > 0) {
    const int gq = lane / 4, t = lane % 4;
    const int64_t words = stride / 2;
    const uint32_t* qw =
        reinterpret_cast<const uint32_t*>(q_tile) + ((warp / 2) * 32 + gq) * words + t;
#pragma unroll
    for (int s = 0; s < KS; ++s) {
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
        const uint32_t* base = qw + mi * 16 * words + s * 8;
        a_reg[s][mi][0] = base[0];
        a_reg[s][mi][1] = base[8 * words];
        a_reg[s][mi][2] = base[4];
        a_reg[s][mi][3] = base[8 * words + 4];
      }
    }
  }
  float best[kAcc];
  int32_t round_of[kAcc];
#pragma unroll
  for (int e = 0; e < kAcc; ++e) {
    best[e] = kNegInf;
    round_of[e] = -1;
  }
  // Warps whose 32 rows hold no query skip the products (16-bit layout).
  const bool rows_used = sizeof(T) == 4 ? (tid / 16) * 8 < nq : (warp / 2) * 32 < nq;
  const int64_t full_end = st.masked_begin < st.end ? st.masked_begin : st.end;

  // S-stage pipeline: tiles n + 1 .. n + S - 1 are in flight while tile n is
  // used. Every iteration commits one copy group (empty past the end), so
  // "all but the newest S - 1 groups done" means tile n has landed.
  const int S = p.stages;
  for (int n = 0; n < S - 1; ++n) {
    if (n < count) {
      load(first + n * step, n);
    } else {
      copy_commit();
    }
  }
  int buf = 0, ahead_buf = S - 1;
  for (int64_t n = 0; n < count;
       ++n, buf = buf + 1 == S ? 0 : buf + 1, ahead_buf = ahead_buf + 1 == S ? 0 : ahead_buf + 1) {
    const int64_t item = first + n * step;
    if (n + S - 1 < count) {
      load(item + (S - 1) * step, ahead_buf);
    } else {
      copy_commit();
    }
    copy_wait_for(S - 1);
    __syncthreads();  // tile `buf` is in shared memory
    const T* k_tile = key_tile(buf);
    if (!ip) {                              // the norm term of each column, from the key as stored
      constexpr int per_col = NT / kTileS;  // threads per column
      const int c = tid / per_col;
      float sq = 0.0f;
      for (int64_t e = tid % per_col; e < p.dim; e += per_col) {
        const float v = Elem<T>::to_float(k_tile[c * stride + e]);
        sq += v * v;
      }
      for (int o = per_col / 2; o > 0; o >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, o);
      if (tid % per_col == 0) k_aux[buf * kTileS + c] = aux_of(p.metric, sq);
      __syncthreads();
    }
    if (rows_used) {
      float acc[kAcc];
      tile_product<T, KS>(q_tile, k_tile, p.dim, a_reg, acc);
      const float* bias = k_bias + buf * kTileS;
      const float* aux = k_aux + buf * kTileS;
      if (st.exact) {  // one row per bin: write each live row's score to its offset's bin
#pragma unroll
        for (int e = 0; e < kAcc; ++e) {
          const int row = acc_row<T>(e), col = acc_col<T>(e);
          if (row < nq && bias[col] == 0.0f) {
            const int64_t o = (g * p.q_count + q0 + row) * L + k_off[buf * kTileS + col];
            p.part_best[o] = apply_metric(acc[e], p.metric, q_sq[row], aux[col]);
            p.part_slot[o] = static_cast<int32_t>(item * kTileS + col);
          }
        }
      } else if (ip && item * L + b0 + cols <= full_end) {  // every column live
        const int32_t r = static_cast<int32_t>(item);
#pragma unroll
        for (int e = 0; e < kAcc; ++e) {
          if (acc[e] > best[e]) {
            best[e] = acc[e];
            round_of[e] = r;
          }
        }
      } else {
        const int32_t r = static_cast<int32_t>(item);
#pragma unroll
        for (int e = 0; e < kAcc; ++e) {
          const int row = acc_row<T>(e), col = acc_col<T>(e);
          const float v = apply_metric(acc[e], p.metric, q_sq[row], aux[col]) + bias[col];
          if (v > best[e]) {
            best[e] = v;
            round_of[e] = r;
          }
        }
      }
    }
    __syncthreads();  // everyone is done with tile `buf` before it is refilled
  }
  if (st.exact) return;  // bins written as found; the select kernel reads only those
  const int64_t part = ((split * p.grid + g) * p.q_count + q0) * L + b0;
#pragma unroll
  for (int e = 0; e < kAcc; ++e) {
    const int row = acc_row<T>(e), col = acc_col<T>(e);
    if (row < nq && col < cols) {
      p.part_best[part + row * L + col] = best[e];
      p.part_slot[part + row * L + col] =
          round_of[e] < 0 ? -1 : static_cast<int32_t>(round_of[e] * L + b0 + col);
    }
  }
}

// --- selection -------------------------------------------------------------------
// One warp per (memory, query): merge the slot ranges bin by bin, take the
// exact top-k of the bin winners, then gather their keys and values.
// Candidates are 64-bit keys, larger = better: the score's bits in an order
// that integers compare like the floats (-0 folded into +0) above the
// complement of the slot, so equal scores put the lower slot first and every
// key is distinct; 0 is "none". With the bins in registers (L <= 32 R), each
// lane sorts its R candidates once and a round is a warp-wide max of the lanes'
// heads, the winner popping its head; otherwise a round is the max of the
// candidates below the previous pick.
struct Cand {
  float score;
  int32_t slot;  // -1: none
};

__device__ __forceinline__ uint64_t cand_key(float score, int32_t slot) {
  if (slot < 0) return 0;
  uint32_t u = __float_as_uint(score + 0.0f);  // -0 + 0 = +0
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return (static_cast<uint64_t>(u) << 32) | static_cast<uint32_t>(~static_cast<uint32_t>(slot));
}

__device__ __forceinline__ Cand cand_of(uint64_t key) {
  if (key == 0) return {kNegInf, -1};
  uint32_t u = static_cast<uint32_t>(key >> 32);
  u = (u & 0x80000000u) ? (u & 0x7FFFFFFFu) : ~u;
  return {__uint_as_float(u), static_cast<int32_t>(~static_cast<uint32_t>(key))};
}

__device__ __forceinline__ uint64_t warp_max(uint64_t v) {
  for (int o = 16; o > 0; o >>= 1) {
    const uint64_t w = __shfl_xor_sync(0xffffffffu, v, o);
    v = w > v ? w : v;
  }
  return v;
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
  int32_t* result_slot;  // [G][q_count][k]: the picks' slots (-1: none), for the gather
  SearchOutput out;
};

// Shared memory of the select kernel: per warp, the query (exact fallback).
__host__ __device__ constexpr int64_t select_smem_bytes(int64_t dim) { return kWarps * dim * 4; }

template <typename T, int R>
__global__ void __launch_bounds__(kThreads) select_kernel(SelectParams p) {
  extern __shared__ __align__(16) float query_smem[];
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
  // An exact search wrote one bin per row held, by stream offset, in range 0.
  const int64_t nb = st.exact ? (st.live < L ? st.live : L) : L;
  const int64_t splits = st.exact ? 1 : p.splits;
  auto merged = [&](int64_t b) {
    float v = best[b];
    int32_t s = slot[b];
    for (int64_t r = 1; r < splits; ++r) {
      const float w = best[b + r * split_stride];
      if (w > v) {
        v = w;
        s = slot[b + r * split_stride];
      }
    }
    return cand_key(v, s);
  };
  uint64_t held[R > 0 ? R : 1];
  int64_t filled = 0;
  if constexpr (R > 0) {
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const int64_t b = lane + 32 * i;
      held[i] = b < nb ? merged(b) : 0;
      filled += held[i] != 0;
    }
    // Sort the lane's candidates, best first (odd-even transposition).
#pragma unroll
    for (int pass = 0; pass < R; ++pass) {
#pragma unroll
      for (int i = pass % 2; i + 1 < R; i += 2) {
        const uint64_t a = held[i], b = held[i + 1];
        held[i] = a > b ? a : b;
        held[i + 1] = a > b ? b : a;
      }
    }
  } else {
    for (int64_t b = lane; b < nb; b += 32) {
      const Cand c = cand_of(merged(b));
      best[b] = c.score;
      slot[b] = c.slot;
      filled += c.slot >= 0;
    }
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

  // The best candidate below `prev`, from memory or recomputed (fallback).
  auto next_below = [&](uint64_t prev) {
    uint64_t mine = 0;
    if (!fallback) {
      for (int64_t b = lane; b < nb; b += 32) {
        const uint64_t c = cand_key(best[b], slot[b]);
        if (c < prev && c > mine) mine = c;
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
        const uint64_t c = cand_key(apply_metric(dot, p.metric, query_sq, aux_of(p.metric, sq)),
                                    static_cast<int32_t>(s));
        if (c < prev && c > mine) mine = c;
      }
    }
    return warp_max(mine);
  };

  // Picks in batches of 32: lane j holds pick j of the batch; the batch's
  // results and slots are written lane-parallel (the gather kernel copies rows).
  uint64_t prev = ~uint64_t{0};
  bool done = false;
  for (int64_t base = 0; base < p.k; base += 32) {
    const int batch = static_cast<int>(p.k - base < 32 ? p.k - base : 32);
    uint64_t pick_of_lane = 0;
    for (int j = 0; j < batch && !done; ++j) {
      uint64_t pick;
      if constexpr (R > 0) {
        if (!fallback) {
          pick = warp_max(held[0]);
          const bool won = pick != 0 && held[0] == pick;
#pragma unroll
          for (int i = 0; i + 1 < R; ++i) held[i] = won ? held[i + 1] : held[i];
          held[R - 1] = won ? 0 : held[R - 1];
        } else {
          pick = next_below(prev);
        }
      } else {
        pick = next_below(prev);
      }
      if (pick == 0) {
        done = true;
      } else {
        if (lane == j) pick_of_lane = pick;
        prev = pick;
      }
    }
    if (lane < batch) {
      const Cand mine = cand_of(pick_of_lane);
      const int64_t o = row * p.k + base + lane;
      int64_t pos = -1;
      if (mine.slot >= 0) {
        const int64_t r = p.offset_of[mine.slot];
        pos = r + p.capacity * ((st.written - 1 - r) / p.capacity);
      }
      p.out.scores[o] = mine.score;
      p.out.mask[o] = mine.slot >= 0;
      if (p.written_is_int32) {
        static_cast<int32_t*>(p.out.indices)[o] = static_cast<int32_t>(pos);
      } else {
        static_cast<int64_t*>(p.out.indices)[o] = pos;
      }
      p.result_slot[(g * p.q_count + qi) * p.k + base + lane] = mine.slot;
    }
  }
}

// --- gather ------------------------------------------------------------------------
// A thread per 4 elements of a result row (key, widened to float32, or value):
// out row o = (g, query, j) copies slot result_slot[g][query][j] of memory g,
// zeros where there is none; the select kernel's parameters, read after it.
// Results [row_begin, row_begin + rows) of the chunk. vec4: dims multiples of 4
// and 16-byte aligned rows, 4 elements per load and store.

template <typename T>
__device__ __forceinline__ void load4(const T* src, float (&v)[4]) {
  if constexpr (sizeof(T) == 4) {
    const float4 x = *reinterpret_cast<const float4*>(src);
    v[0] = x.x;
    v[1] = x.y;
    v[2] = x.z;
    v[3] = x.w;
  } else {
    const uint2 x = *reinterpret_cast<const uint2*>(src);
    const T* h = reinterpret_cast<const T*>(&x);
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] = Elem<T>::to_float(h[i]);
  }
}

template <typename T>
__global__ void gather_kernel(SelectParams p, bool vec4, int64_t row_begin, unsigned rows) {
  const unsigned key_parts = static_cast<unsigned>(vec4 ? p.dim / 4 : p.dim);
  const unsigned value_parts = static_cast<unsigned>(vec4 ? p.value_dim / 4 : p.value_dim);
  const unsigned per_row = (p.out.keys ? key_parts : 0u) + (p.out.values ? value_parts : 0u);
  const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  if (per_row == 0 || i >= rows * per_row) return;
  const unsigned local = i / per_row;
  unsigned part = i % per_row;
  const int64_t r = row_begin + local;  // [g][query][j] within the chunk
  const int64_t per_memory = p.q_count * p.k;
  const int64_t g = r / per_memory, rest = r % per_memory;
  const int32_t s = p.result_slot[r];
  const int64_t o = (g * p.num_queries + p.q_begin) * p.k + rest;  // output row
  const bool key_part = p.out.keys && part < key_parts;
  if (!key_part && p.out.keys) part -= key_parts;
  const int width = vec4 ? 4 : 1;
  float v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  if (key_part) {
    const T* src = static_cast<const T*>(p.keys) + (g * p.capacity + s) * p.dim + part * width;
    if (s >= 0) {
      if (vec4) {
        load4<T>(src, v);
      } else {
        v[0] = Elem<T>::to_float(*src);
      }
    }
    float* dst = p.out.keys + o * p.dim + part * width;
    if (vec4) {
      *reinterpret_cast<float4*>(dst) = make_float4(v[0], v[1], v[2], v[3]);
    } else {
      *dst = v[0];
    }
  } else {
    const float* src = p.values + (g * p.capacity + s) * p.value_dim + part * width;
    if (s >= 0) {
      if (vec4) {
        load4<float>(src, v);
      } else {
        v[0] = *src;
      }
    }
    float* dst = p.out.values + o * p.value_dim + part * width;
    if (vec4) {
      *reinterpret_cast<float4*>(dst) = make_float4(v[0], v[1], v[2], v[3]);
    } else {
      *dst = v[0];
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

// Queries per score block: 128 (8 warps) for float32 keys, 64 (4 warps) for
// 16-bit keys -- on an H200, M1 float32 ran 25% faster with 128 than with 64,
// M1/M2 bfloat16 the same within 3%.
template <typename T>
constexpr int score_query_tile() {
  return sizeof(T) == 4 ? 128 : 64;
}

// Shared memory of a score block with one key tile (the least it can run with).
int64_t tiles_bytes(int64_t dim, KeyFormat dtype) {
  return dtype == KeyFormat::kFloat32
             ? score_smem<float>(dim, 1, score_query_tile<float>()).total
             : score_smem<__half>(dim, 1, score_query_tile<__half>()).total;  // bf16, fp16
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

template <typename T, int KS, int WM>
void launch_scores(const ScoreParams& sp, dim3 grid, int64_t smem, cudaStream_t stream) {
  check(cudaFuncSetAttribute(score_bins_kernel<T, KS, WM>,
                             cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
        "score kernel attributes");
  score_bins_kernel<T, KS, WM><<<grid, 64 * WM, smem, stream>>>(sp);
  check_launch("search (score kernel)");
}

template <typename T, int KS>
void launch_scores(const ScoreParams& sp, dim3 grid, int64_t smem, cudaStream_t stream) {
  launch_scores<T, KS, score_query_tile<T>() / 32>(sp, grid, smem, stream);
}

template <typename T, int R>
void launch_select(const SelectParams& sel, unsigned blocks, int64_t smem, cudaStream_t stream) {
  if (smem > (48 << 10)) {
    check(cudaFuncSetAttribute(select_kernel<T, R>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(smem)),
          "select kernel attributes");
  }
  select_kernel<T, R><<<blocks, kThreads, smem, stream>>>(sel);
}

template <typename T>
void launch_search(const RingView& ring, const float* queries, int64_t num_queries, int64_t k,
                   Metric metric, const SearchPlan& plan, void* workspace, const SearchOutput& out,
                   cudaStream_t stream) {
  const int64_t smem_limit = std::min<int64_t>(device_smem_optin(), kSmemBudget);
  constexpr int query_tile = score_query_tile<T>();
  int stages = kMaxStages;
  while (stages > 1 && score_smem<T>(ring.key_dim, stages, query_tile).total > smem_limit) {
    --stages;
  }
  const int64_t smem = score_smem<T>(ring.key_dim, stages, query_tile).total;
  if (smem > smem_limit) {
    throw InvalidArgument("key_dim: " + std::to_string(ring.key_dim) +
                          " is too large for the CUDA search kernel on this device (" +
                          std::to_string(smem) + " bytes of shared memory, " +
                          std::to_string(smem_limit) + " available)");
  }
  const int64_t part_elems = plan.splits * ring.grid * plan.query_chunk * plan.bins;
  float* part_best = static_cast<float*>(workspace);
  int32_t* part_slot = reinterpret_cast<int32_t*>(part_best + part_elems);
  int32_t* result_slot = part_slot + part_elems;
  // Exact blocks share the slot tiles by stride, so their count may be capped.
  const int64_t bin_tiles = std::min<int64_t>((plan.bins + kTileS - 1) / kTileS, 65535);
  const int64_t per16 = 16 / static_cast<int64_t>(sizeof(T));
  const int k_steps = static_cast<int>(padded_dim<T>(ring.key_dim) / 16);

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
    sp.bin_tiles = bin_tiles;
    sp.split_rounds = plan.split_len / plan.bins;
    sp.metric = static_cast<int>(metric);
    sp.stages = stages;
    sp.vec_loads = ring.key_dim % per16 == 0 && reinterpret_cast<uintptr_t>(ring.keys) % 16 == 0;
    sp.part_best = part_best;
    sp.part_slot = part_slot;
    const int64_t q_tiles = (q_count + query_tile - 1) / query_tile;
    const dim3 score_grid(static_cast<unsigned>(ring.grid * q_tiles),
                          static_cast<unsigned>(bin_tiles), static_cast<unsigned>(plan.splits));
    if constexpr (sizeof(T) == 2) {
      switch (k_steps) {  // small key_dim: the query fragments stay in registers
        case 1:
          launch_scores<T, 1>(sp, score_grid, smem, stream);
          break;
        case 2:
          launch_scores<T, 2>(sp, score_grid, smem, stream);
          break;
        case 3:
          launch_scores<T, 3>(sp, score_grid, smem, stream);
          break;
        case 4:
          launch_scores<T, 4>(sp, score_grid, smem, stream);
          break;
        default:
          launch_scores<T, 0>(sp, score_grid, smem, stream);
      }
    } else {
      launch_scores<T, 0>(sp, score_grid, smem, stream);
    }

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
    sel.result_slot = result_slot;
    sel.out = out;
    const int64_t select_smem = select_smem_bytes(ring.key_dim);
    const unsigned select_blocks =
        static_cast<unsigned>((ring.grid * q_count + kWarps - 1) / kWarps);
    const int64_t per_lane = (plan.bins + 31) / 32;  // bins each lane holds in registers
    if (per_lane <= 2) {
      launch_select<T, 2>(sel, select_blocks, select_smem, stream);
    } else if (per_lane <= 4) {
      launch_select<T, 4>(sel, select_blocks, select_smem, stream);
    } else if (per_lane <= 6) {
      launch_select<T, 6>(sel, select_blocks, select_smem, stream);
    } else if (per_lane <= 8) {
      launch_select<T, 8>(sel, select_blocks, select_smem, stream);
    } else {
      launch_select<T, 0>(sel, select_blocks, select_smem, stream);
    }
    check_launch("search (select kernel)");

    if (out.keys || out.values) {
      auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
      const bool vec4 = ring.key_dim % 4 == 0 && ring.value_dim % 4 == 0 && aligned(ring.keys) &&
                        aligned(ring.values) && aligned(out.keys) && aligned(out.values);
      const int64_t per_row = (out.keys ? ring.key_dim : 0) + (out.values ? ring.value_dim : 0);
      const int64_t total_rows = ring.grid * q_count * k;
      const int64_t rows_per_launch = std::max<int64_t>(1, (int64_t{1} << 30) / per_row);
      for (int64_t r0 = 0; r0 < total_rows; r0 += rows_per_launch) {
        const int64_t rows = std::min(rows_per_launch, total_rows - r0);
        const int64_t threads = rows * (vec4 ? per_row / 4 : per_row);
        gather_kernel<T><<<static_cast<unsigned>((threads + 255) / 256), 256, 0, stream>>>(
            sel, vec4, r0, static_cast<unsigned>(rows));
        check_launch("search (gather kernel)");
      }
    }
  }
}

}  // namespace

KeyFormat parse_key_dtype(const std::string& name) {
  for (const KeyFormat f : {KeyFormat::kFloat32, KeyFormat::kBFloat16, KeyFormat::kFloat16}) {
    if (name == key_format_name(f)) return f;
  }
  throw InvalidArgument("dtype: expected 'float32', 'bfloat16' or 'float16', got '" + name + "'");
}

SearchPlan plan_search(int64_t grid, int64_t capacity, int64_t key_dim, int64_t num_queries,
                       int64_t k, double recall_target, KeyFormat dtype, int64_t workspace_limit) {
  check_search_options(k, recall_target, capacity);
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
  // Blocks scan whole rounds of the bins (slots r L .. r L + L - 1); memories
  // with few query tiles are cut into ranges of rounds so the device fills.
  const int64_t rounds = (capacity + plan.bins - 1) / plan.bins;
  const int64_t bin_tiles = (plan.bins + kTileS - 1) / kTileS;
  for (;;) {
    const int64_t q_tiles = (plan.query_chunk + kTileQ - 1) / kTileQ;
    const int64_t blocks = std::max<int64_t>(1, grid * q_tiles * bin_tiles);
    int64_t splits = 1;
    if (plan.num_bins != 0) {  // exact mode keeps one bin per row: one range
      splits = std::clamp<int64_t>((kTargetBlocks + blocks - 1) / blocks, 1,
                                   std::max<int64_t>(1, rounds / kMinSplitRounds));
      splits = std::min<int64_t>(splits, 65535);
    }
    const int64_t per = (rounds + splits - 1) / splits;
    plan.split_len = per * plan.bins;
    plan.splits = (rounds + per - 1) / per;
    plan.workspace_bytes =
        plan.splits * grid * plan.query_chunk * plan.bins * (sizeof(float) + sizeof(int32_t)) +
        grid * plan.query_chunk * k * sizeof(int32_t);  // the picks' slots, for the gather
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
    case KeyFormat::kBFloat16:
      launch_search<__nv_bfloat16>(ring, queries, num_queries, k, metric, plan, workspace, out, s);
      break;
    case KeyFormat::kFloat16:
      launch_search<__half>(ring, queries, num_queries, k, metric, plan, workspace, out, s);
      break;
    default:
      launch_search<float>(ring, queries, num_queries, k, metric, plan, workspace, out, s);
  }
}

void add(void* keys, KeyFormat dtype, float* values, int64_t* written, const int32_t* slot_of,
         int64_t grid, int64_t capacity, int64_t key_dim, int64_t value_dim, const float* new_keys,
         const float* new_values, int64_t num_rows, void* stream) {
  if (num_rows == 0 || grid == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  const int64_t first = std::max<int64_t>(0, num_rows - capacity);
  const unsigned blocks = blocks_for(grid * (num_rows - first), 1);
  const unsigned threads = 128;
  switch (dtype) {
    case KeyFormat::kBFloat16:
      add_kernel<__nv_bfloat16><<<blocks, threads, 0, s>>>(
          static_cast<__nv_bfloat16*>(keys), values, written, slot_of, grid, capacity, key_dim,
          value_dim, new_keys, new_values, num_rows, first);
      break;
    case KeyFormat::kFloat16:
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
