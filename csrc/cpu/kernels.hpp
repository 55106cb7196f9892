// Scoring kernels on borrowed buffers (CPU).
//
// This is the portable variant: plain C++ written so that the compiler
// vectorises it for the baseline ISA. Every dot product accumulates into
// kLanes independent partial sums over consecutive dimensions and reduces
// them in a fixed tree, so a row padded with zeros to a multiple of kLanes
// gives bit-identical results to the unpadded row.
#pragma once

#include <cstdint>

namespace knnmem::cpu {

inline constexpr int64_t kLanes = 16;

// |x|^2 with the same summation order as dot_tile.
float squared_norm(const float* x, int64_t dim);

// tile[q * tile_stride + j] = <queries[q], keys[j]> for q < num_queries,
// j < num_keys. queries rows are q_stride apart, key rows key_stride apart.
void dot_tile(const float* queries, int64_t num_queries, int64_t q_stride, const float* keys,
              int64_t num_keys, int64_t key_stride, int64_t dim, float* tile, int64_t tile_stride);

}  // namespace knnmem::cpu
