// CPU emulation of the CUDA subset csrc/cuda/kernels.cu uses (tests/cuda_emu).
// Blocks run one after another; the threads of a block are std::threads with a
// barrier for __syncthreads and one per warp for __syncwarp and shuffles.
#pragma once

#include <algorithm>
#include <barrier>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorMemoryAllocation = 2 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
struct CUstream_st;
using cudaStream_t = CUstream_st*;

namespace emu {
constexpr int kMaxSmem = 227 * 1024;  // an H100's opt-in limit
struct Ctx {
  uint3 thread, block;
  dim3 block_dim, grid_dim;
  std::barrier<>* block_barrier = nullptr;
  std::barrier<>* warp_barrier = nullptr;
  uint64_t* warp_slots = nullptr;  // 32 per warp
  uint32_t* warp_mma = nullptr;    // 32 x 6 per warp: mma fragments in exchange
};
inline thread_local Ctx ctx;
inline unsigned char* shared_mem() {
  alignas(128) static unsigned char buf[kMaxSmem];
  return buf;
}
inline int& launched_smem_limit() {
  static int limit = 48 * 1024;
  return limit;
}

// Runs kernel(args...) over the grid, block by block.
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t, A&&... args) {
  if (smem > static_cast<size_t>(kMaxSmem)) {
    std::fprintf(stderr, "emu: %zu bytes of dynamic shared memory > %d\n", smem, kMaxSmem);
    std::abort();
  }
  if (smem > 48 * 1024 && static_cast<int>(smem) > launched_smem_limit()) {
    std::fprintf(stderr, "emu: %zu bytes of shared memory without the attribute\n", smem);
    std::abort();
  }
  const unsigned threads = block.x * block.y * block.z;
  const unsigned warps = (threads + 31) / 32;
  std::barrier<> block_barrier(threads);
  std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
  for (unsigned w = 0; w < warps; ++w) {
    warp_barriers.push_back(std::make_unique<std::barrier<>>(std::min(32u, threads - 32 * w)));
  }
  std::vector<uint64_t> slots(32 * warps);
  std::vector<uint32_t> mma_slots(32 * 6 * warps);
  std::vector<std::thread> pool;
  // One thread per CUDA thread for the whole launch; blocks run one after another.
  for (unsigned t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      ctx.thread = {t % block.x, t / block.x % block.y, t / (block.x * block.y)};
      ctx.block_dim = block;
      ctx.grid_dim = grid;
      ctx.block_barrier = &block_barrier;
      ctx.warp_barrier = warp_barriers[t / 32].get();
      ctx.warp_slots = slots.data() + 32 * (t / 32);
      ctx.warp_mma = mma_slots.data() + 32 * 6 * (t / 32);
      for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
          for (unsigned bx = 0; bx < grid.x; ++bx) {
            if (t == 0) std::memset(shared_mem(), 0xA5, kMaxSmem);  // garbage, as on a GPU
            block_barrier.arrive_and_wait();
            ctx.block = {bx, by, bz};
            kernel(args...);
            block_barrier.arrive_and_wait();  // the block is done before the next starts
          }
    });
  }
  for (auto& th : pool) th.join();
}
}  // namespace emu

#define threadIdx (::emu::ctx.thread)
#define blockIdx (::emu::ctx.block)
#define blockDim (::emu::ctx.block_dim)
#define gridDim (::emu::ctx.grid_dim)

inline void __syncthreads() { emu::ctx.block_barrier->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::ctx.warp_barrier->arrive_and_wait(); }
[[noreturn]] inline void __trap() { std::abort(); }

template <typename T>
T __shfl_xor_sync(unsigned, T v, int mask) {
  static_assert(sizeof(T) <= 8);
  const unsigned lane = threadIdx.x % 32;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  emu::ctx.warp_slots[lane] = bits;
  __syncwarp();
  bits = emu::ctx.warp_slots[lane ^ static_cast<unsigned>(mask)];
  __syncwarp();
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

inline unsigned __float_as_uint(float x) {
  unsigned u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}
inline float __uint_as_float(unsigned u) {
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}

inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "emulated error"; }
inline const char* cudaGetErrorName(cudaError_t) { return "cudaErrorEmulated"; }
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr, int) {
  *v = emu::kMaxSmem;
  return cudaSuccess;
}
template <typename F>
cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int value) {
  if (value > emu::kMaxSmem) return cudaErrorInvalidValue;
  emu::launched_smem_limit() = std::max(emu::launched_smem_limit(), value);
  return cudaSuccess;
}

// Memory: "device" memory is host memory; copies are memcpy; streams are in order.
enum cudaMemcpyKind { cudaMemcpyHostToDevice = 1, cudaMemcpyDeviceToHost = 2 };
inline cudaError_t cudaMalloc(void** p, size_t bytes) {
  *p = std::aligned_alloc(256, (bytes + 255) / 256 * 256);
  return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
inline cudaError_t cudaFree(void* p) {
  std::free(p);
  return cudaSuccess;
}
inline cudaError_t cudaMemset(void* p, int v, size_t n) {
  std::memset(p, v, n);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpy(void* d, const void* s, size_t n, cudaMemcpyKind) {
  std::memcpy(d, s, n);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t n, cudaMemcpyKind,
                                   cudaStream_t = nullptr) {
  std::memcpy(d, s, n);
  return cudaSuccess;
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaSetDevice(int) { return cudaSuccess; }
