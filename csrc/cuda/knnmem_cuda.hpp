// knnmem CUDA kernels: the engine of csrc/core on device buffers.
//
// This header has no CUDA includes, so host code (pybind11 and XLA FFI
// boundaries) compiled by the ordinary C++ compiler can call the kernels,
// which live in kernels.cu and are compiled by nvcc. Every pointer below is a
// device pointer; every function only enqueues work on `stream` (a
// cudaStream_t passed as void*; nullptr = the legacy default stream): nothing
// synchronises with the host and nothing allocates. Inputs are trusted (the
// front ends check shapes, dtypes and finiteness first).
//
// Ring layout (the caller-owned layout of knnmem.ops, rows not panels):
//   keys      [G][capacity][key_dim]    float32, bfloat16 or float16
//   values    [G][capacity][value_dim]  float32
//   written   [G]                       int64 (or int32: XLA without x64)
//   slot_of / offset_of [capacity]      int32, the core's Placement tables
// Row p of a memory's stream lives in slot slot_of[p mod capacity].
//
// Search results equal those of knnmem::search (csrc/core/search.cpp) up to
// floating-point summation order: bins are strided over physical slots
// (bin = slot mod L, L from bins_for_search), a bin keeps its best score and,
// among equal scores, its lowest slot; the k best bin winners come out in the
// order (score desc, slot asc); a memory with fewer non-empty bins than
// min(k, rows held) is searched exactly, as on the CPU.
#pragma once

#include <cstdint>
#include <string>

#include "knnmem/knnmem.hpp"

namespace knnmem::cuda {

// Keys on the device are stored as the core's KeyFormat: float32, bfloat16 or
// float16 (there are no CUDA kernels for int8 keys).
// Parses "float32" | "bfloat16" | "float16"; throws InvalidArgument naming `dtype`.
KeyFormat parse_key_dtype(const std::string& name);
// Bytes of one key element on the device: 4 or 2.
inline int64_t key_dtype_size(KeyFormat dtype) { return dtype == KeyFormat::kFloat32 ? 4 : 2; }

struct RingView {
  const void* keys = nullptr;
  const float* values = nullptr;
  const void* written = nullptr;  // int64, or int32 when written_is_int32
  bool written_is_int32 = false;
  const int32_t* offset_of = nullptr;
  int64_t grid = 0;
  int64_t capacity = 0;
  int64_t key_dim = 0;
  int64_t value_dim = 0;
  KeyFormat key_dtype = KeyFormat::kFloat32;
};

// Search outputs, [G][Q][k](...) device buffers. indices are int64, or int32
// when the ring's written is int32. keys/values may be null (not gathered).
struct SearchOutput {
  float* scores = nullptr;
  void* indices = nullptr;
  bool* mask = nullptr;
  float* keys = nullptr;
  float* values = nullptr;
};

// How a search is cut into launches. Depends only on the sizes (not on the
// device), so XLA can size the workspace at trace time.
struct SearchPlan {
  int64_t num_bins = 0;   // 0 = exact
  int64_t bins = 0;       // bin slots per query in the workspace
  int64_t splits = 1;     // slot ranges per memory, reduced separately then merged
  int64_t split_len = 0;  // slots per range: whole rounds of the bins (a multiple of bins)
  int64_t query_chunk = 0;
  int64_t workspace_bytes = 0;
};

// Default cap on the workspace: queries are searched in chunks to stay under it.
inline constexpr int64_t kDefaultWorkspaceLimit = int64_t{1} << 30;

// Throws InvalidArgument for k outside [1, capacity], recall_target outside
// (0, 1], or a key_dim the kernels cannot hold in shared memory.
SearchPlan plan_search(int64_t grid, int64_t capacity, int64_t key_dim, int64_t num_queries,
                       int64_t k, double recall_target, KeyFormat dtype,
                       int64_t workspace_limit = kDefaultWorkspaceLimit);

// queries [G][Q][key_dim] float32. workspace: at least plan.workspace_bytes,
// 256-byte aligned (cudaMalloc memory is). Throws std::runtime_error if a
// launch fails (the message has CUDA's error string).
void search(const RingView& ring, const float* queries, int64_t num_queries, int64_t k,
            Metric metric, const SearchPlan& plan, void* workspace, const SearchOutput& out,
            void* stream);

// Appends T rows per memory (FIFO): new_keys [G][T][key_dim], new_values
// [G][T][value_dim] float32; keys are rounded to the ring's dtype (nearest
// even). written (int64) advances by T; only the last `capacity` rows are
// stored.
void add(void* keys, KeyFormat dtype, float* values, int64_t* written, const int32_t* slot_of,
         int64_t grid, int64_t capacity, int64_t key_dim, int64_t value_dim, const float* new_keys,
         const float* new_values, int64_t num_rows, void* stream);

// written[g] = 0 where mask[g] (bool, device) is true, or everywhere when mask is null.
void clear(int64_t* written, const bool* mask, int64_t grid, void* stream);

// Devices this process can use; 0 (never an exception) without a driver or GPU.
int device_count();
// Why device_count() is 0 ("" when it is not): CUDA's own message.
std::string device_status();

}  // namespace knnmem::cuda
