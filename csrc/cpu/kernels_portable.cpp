#include <cstring>

#include "cpu/kernels.hpp"

namespace knnmem::cpu {
namespace {

inline float reduce_lanes(float* acc) {
  for (int64_t width = kLanes / 2; width >= 1; width /= 2) {
    for (int64_t l = 0; l < width; ++l) acc[l] += acc[l + width];
  }
  return acc[0];
}

// Accumulates R queries against one key row.
template <int R>
inline void dot_rows(const float* const* q, const float* key, int64_t dim, float* out) {
  float acc[R][kLanes];
  std::memset(acc, 0, sizeof(acc));
  int64_t i = 0;
  for (; i + kLanes <= dim; i += kLanes) {
    for (int r = 0; r < R; ++r) {
      for (int64_t l = 0; l < kLanes; ++l) acc[r][l] += q[r][i + l] * key[i + l];
    }
  }
  const int64_t rest = dim - i;
  for (int r = 0; r < R; ++r) {
    for (int64_t l = 0; l < rest; ++l) acc[r][l] += q[r][i + l] * key[i + l];
  }
  for (int r = 0; r < R; ++r) out[r] = reduce_lanes(acc[r]);
}

}  // namespace

float squared_norm(const float* x, int64_t dim) {
  float out;
  dot_rows<1>(&x, x, dim, &out);
  return out;
}

void dot_tile(const float* queries, int64_t num_queries, int64_t q_stride, const float* keys,
              int64_t num_keys, int64_t key_stride, int64_t dim, float* tile, int64_t tile_stride) {
  constexpr int R = 4;
  for (int64_t j = 0; j < num_keys; ++j) {
    const float* key = keys + j * key_stride;
    int64_t q = 0;
    for (; q + R <= num_queries; q += R) {
      const float* rows[R];
      for (int r = 0; r < R; ++r) rows[r] = queries + (q + r) * q_stride;
      float out[R];
      dot_rows<R>(rows, key, dim, out);
      for (int r = 0; r < R; ++r) tile[(q + r) * tile_stride + j] = out[r];
    }
    for (; q < num_queries; ++q) {
      const float* row = queries + q * q_stride;
      dot_rows<1>(&row, key, dim, tile + q * tile_stride + j);
    }
  }
}

}  // namespace knnmem::cpu
