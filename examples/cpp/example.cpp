// Using the knnmem core from C++ without Python: a grid of two memories,
// one segment added, an approximate top-4 search.
#include <cstdio>
#include <random>
#include <vector>

#include "knnmem/knnmem.hpp"

int main() {
  const int64_t grid = 2, capacity = 4096, dim = 32, rows = 1000, queries = 3, k = 4;
  knnmem::Memory memory(grid, capacity, dim, /*value_dim=*/dim, knnmem::Metric::kCosine);

  std::mt19937 rng(0);
  std::normal_distribution<float> normal;
  std::vector<float> keys(grid * rows * dim);
  for (float& x : keys) x = normal(rng);
  memory.add(keys.data(), /*values=*/keys.data(), rows);

  // Query with the rows at positions 10, 20, 30 of each memory.
  std::vector<float> q(grid * queries * dim);
  for (int64_t g = 0; g < grid; ++g) {
    for (int64_t i = 0; i < queries; ++i) {
      for (int64_t j = 0; j < dim; ++j) {
        q[(g * queries + i) * dim + j] = keys[(g * rows + 10 * (i + 1)) * dim + j];
      }
    }
  }
  std::vector<float> scores(grid * queries * k);
  std::vector<int64_t> indices(grid * queries * k);
  std::vector<char> mask(grid * queries * k);
  knnmem::SearchOutput out{scores.data(), indices.data(), reinterpret_cast<bool*>(mask.data())};
  memory.search(q.data(), queries, k, /*recall_target=*/0.9, out);

  for (int64_t g = 0; g < grid; ++g) {
    for (int64_t i = 0; i < queries; ++i) {
      std::printf("memory %lld query %lld:", static_cast<long long>(g), static_cast<long long>(i));
      for (int64_t j = 0; j < k; ++j) {
        const int64_t o = (g * queries + i) * k + j;
        std::printf("  #%lld (%.3f)", static_cast<long long>(indices[o]), scores[o]);
      }
      std::printf("\n");
    }
  }
  // The nearest row to a stored row is itself.
  return indices[0] == 10 && indices[k] == 20 ? 0 : 1;
}
