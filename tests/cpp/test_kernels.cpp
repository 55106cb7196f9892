// Every scan variant this CPU runs against the portable one, for each key format
// and metric, through the public header: exact searches find the same rows
// wherever the scores are not near-ties (int8: always, every variant computes
// the same integers), with scores equal to rounding. Cross-built for aarch64
// it checks the NEON variants under qemu (scripts/check_aarch64.sh). Last, searches of
// small-integer data (exact scores, many ties) must agree exactly.
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "knnmem/knnmem.hpp"

namespace {

int failures = 0;

void fail(const std::string& what) {
  std::printf("FAILED %s\n", what.c_str());
  ++failures;
}

struct Out {
  std::vector<float> scores;
  std::vector<int64_t> indices;
  std::vector<char> mask;
};

Out search(const knnmem::Memory& m, const std::vector<float>& q, int64_t nq, int64_t k,
           double target) {
  const int64_t n = m.grid() * nq * k;
  Out o{std::vector<float>(n), std::vector<int64_t>(n), std::vector<char>(n)};
  m.search(q.data(), nq, k, target,
           {o.scores.data(), o.indices.data(), reinterpret_cast<bool*>(o.mask.data()), nullptr,
            nullptr});
  return o;
}

}  // namespace

int main() {
  const auto variants = knnmem::supported_kernels();
  std::printf("variants:");
  for (const auto& v : variants) std::printf(" %s", v.c_str());
  std::printf("\n");
  const knnmem::KeyFormat formats[] = {knnmem::KeyFormat::kFloat32, knnmem::KeyFormat::kBFloat16,
                                       knnmem::KeyFormat::kFloat16, knnmem::KeyFormat::kInt8};
  const knnmem::Metric metrics[] = {knnmem::Metric::kInnerProduct, knnmem::Metric::kCosine,
                                    knnmem::Metric::kL2};
  const int64_t grid = 2, capacity = 300, dim = 37, nq = 29, k = 10;
  std::mt19937 gen(7);
  std::normal_distribution<float> normal;
  std::vector<float> keys(grid * 400 * dim), values(grid * 400), queries(grid * nq * dim);
  for (float& x : keys) x = normal(gen);
  for (float& x : values) x = normal(gen);
  for (float& x : queries) x = normal(gen);
  int checked = 0;
  for (const auto format : formats) {
    for (const auto metric : metrics) {
      knnmem::Memory mem(grid, capacity, dim, 1, metric, format);
      mem.add(keys.data(), values.data(), 400);
      for (const double target : {1.0, 0.9}) {
        knnmem::set_kernel("portable");
        const Out want = search(mem, queries, nq, k, target);
        for (const auto& variant : variants) {
          knnmem::set_kernel(variant);
          const Out got = search(mem, queries, nq, k, target);
          const std::string what = variant + " " + knnmem::key_format_name(format) + " " +
                                   std::to_string(static_cast<int>(metric)) + " target " +
                                   std::to_string(target);
          // bfloat16 may round the queries too (AVX512_BF16): 2^-8 relative to the score scale
          float scale = 0.0f;
          for (float s : want.scores) scale = std::max(scale, std::fabs(s));
          const float tol = scale * (format == knnmem::KeyFormat::kBFloat16 ? 1e-2f : 1e-5f);
          int64_t same = 0, sure = 0;
          for (std::size_t i = 0; i < want.scores.size(); ++i) {
            if (got.mask[i] != want.mask[i]) fail(what + ": mask");
            if (std::fabs(got.scores[i] - want.scores[i]) > tol) {
              fail(what + ": score " + std::to_string(got.scores[i]) + " vs " +
                   std::to_string(want.scores[i]));
              break;
            }
            const bool tied = (i % k > 0 && want.scores[i - 1] - want.scores[i] <= 2 * tol) ||
                              (i % k + 1 < static_cast<std::size_t>(k) &&
                               want.scores[i] - want.scores[i + 1] <= 2 * tol) ||
                              i % k + 1 == static_cast<std::size_t>(k);
            if (format == knnmem::KeyFormat::kInt8 && got.indices[i] != want.indices[i]) {
              fail(what + ": int8 indices differ");
              break;
            }
            if (!tied) {
              ++sure;
              same += got.indices[i] == want.indices[i];
            }
          }
          // exact: every decided index agrees; approximate: a rounding can change a
          // bin's winner, so most (bfloat16 with rounded queries: fewer) must
          const double agree = sure ? static_cast<double>(same) / sure : 1.0;
          const double need = target == 1.0                            ? 1.0
                              : format == knnmem::KeyFormat::kBFloat16 ? 0.9
                                                                       : 0.99;
          if (sure < static_cast<int64_t>(want.scores.size()) / 20 || agree < need) {
            fail(what + ": indices agree " + std::to_string(agree) + " over " +
                 std::to_string(sure));
          }
          ++checked;
        }
      }
    }
  }
  // Small-integer keys and queries score exactly in every variant, with many
  // equal scores: the selection of the bin winners (its counting loops run in
  // the variant too) must return the same rows in the same order.
  {
    std::uniform_int_distribution<int> small(-1, 1);
    const int64_t n = 3000, d = 8, q = 40;
    std::vector<float> ints(n * d), iq(q * d), zeros(n);
    for (float& x : ints) x = static_cast<float>(small(gen));
    for (float& x : iq) x = static_cast<float>(small(gen));
    knnmem::Memory mem(1, n, d, 1);
    mem.add(ints.data(), zeros.data(), n);
    for (const int64_t kk : {int64_t{5}, int64_t{32}, int64_t{100}}) {
      knnmem::set_kernel("portable");
      const Out want = search(mem, iq, q, kk, 0.9);
      for (const auto& variant : variants) {
        knnmem::set_kernel(variant);
        const Out got = search(mem, iq, q, kk, 0.9);
        if (got.scores != want.scores || got.indices != want.indices) {
          fail(variant + ": tied scores, k=" + std::to_string(kk) + ": results differ");
        }
        ++checked;
      }
    }
  }
  knnmem::set_kernel("");
  std::printf("%d comparisons, %d failures\n", checked, failures);
  return failures == 0 && checked > 0 ? 0 : 1;
}
