// C++ tests of the knnmem core through its public header only.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "check.hpp"
#include "knnmem/knnmem.hpp"

namespace {

struct Results {
  std::vector<float> scores;
  std::vector<int64_t> indices;
  std::vector<char> mask;
  std::vector<float> keys;
  std::vector<float> values;
};

Results run(const knnmem::Memory& m, const std::vector<float>& q, int64_t nq, int64_t k,
            double target) {
  const int64_t n = m.grid() * nq * k;
  Results r{std::vector<float>(n), std::vector<int64_t>(n), std::vector<char>(n),
            std::vector<float>(n * m.key_dim()), std::vector<float>(n * m.value_dim())};
  m.search(q.data(), nq, k, target,
           {r.scores.data(), r.indices.data(), reinterpret_cast<bool*>(r.mask.data()),
            r.keys.data(), r.values.data()});
  return r;
}

void test_recall_model() {
  CHECK(knnmem::bins_for_recall(32, 0.9) == 145);
  CHECK(knnmem::bins_for_recall(32, 0.95) == 300);
  CHECK(knnmem::bins_for_recall(32, 1.0) == 0);
  CHECK(std::abs(knnmem::expected_recall(145, 32) - 0.90012) < 1e-4);
  bool threw = false;
  try {
    knnmem::bins_for_recall(32, 1.5);
  } catch (const knnmem::InvalidArgument& e) {
    threw = std::string(e.what()).rfind("recall_target:", 0) == 0;
  }
  CHECK(threw);
}

// Exact search against brute force over a wrapped ring, then recall of the
// approximate search against it.
void test_search() {
  const int64_t capacity = 5000, dim = 24, rows = 7000, nq = 200, k = 16;
  knnmem::Memory m(1, capacity, dim, 1);
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  std::vector<float> keys(rows * dim), values(rows), q(nq * dim);
  for (float& x : keys) x = normal(rng);
  for (float& x : q) x = normal(rng);
  std::iota(values.begin(), values.end(), 0.0f);
  m.add(keys.data(), values.data(), 3000);
  m.add(keys.data() + 3000 * dim, values.data() + 3000, rows - 3000);
  CHECK(m.written()[0] == rows && m.count()[0] == capacity);

  Results exact = run(m, q, nq, k, 1.0);
  Results approx = run(m, q, nq, k, 0.9);
  int64_t hits = 0;
  for (int64_t i = 0; i < nq; ++i) {
    std::vector<std::pair<float, int64_t>> all;
    for (int64_t p = rows - capacity; p < rows; ++p) {
      float s = 0;
      for (int64_t j = 0; j < dim; ++j) s += q[i * dim + j] * keys[p * dim + j];
      all.push_back({s, p});
    }
    std::partial_sort(all.begin(), all.begin() + k, all.end(),
                      [](auto a, auto b) { return a.first > b.first; });
    std::set<int64_t> truth;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t o = i * k + j;
      CHECK(std::abs(exact.scores[o] - all[j].first) < 1e-4f);
      CHECK(exact.values[o] == static_cast<float>(exact.indices[o]));  // value = position
      truth.insert(exact.indices[o]);
    }
    for (int64_t j = 0; j < k; ++j) hits += truth.count(approx.indices[i * k + j]);
  }
  const double recall = static_cast<double>(hits) / (nq * k);
  const double predicted =
      knnmem::expected_recall(knnmem::bins_for_search(k, 0.9, knnmem::KeyFormat::kFloat32), k);
  std::printf("recall %.4f, predicted %.4f\n", recall, predicted);
  CHECK(std::abs(recall - predicted) < 0.03);
}

void test_clear_and_bad_k() {
  knnmem::Memory m(3, 10, 2, 2);
  std::vector<float> rows(3 * 4 * 2, 1.0f);
  m.add(rows.data(), rows.data(), 4);
  const uint8_t which[3] = {0, 1, 0};
  m.clear(which);
  CHECK((m.count() == std::vector<int64_t>{4, 0, 4}));
  std::vector<float> q(3 * 2, 1.0f);
  Results r = run(m, q, 1, 5, 0.9);
  CHECK(r.mask[0] && !r.mask[4] && !r.mask[5] && r.indices[5] == -1);
  bool threw = false;
  try {
    run(m, q, 1, 11, 0.9);
  } catch (const knnmem::InvalidArgument& e) {
    threw = std::string(e.what()).rfind("k:", 0) == 0;
  }
  CHECK(threw);
}

// export_state -> import_state gives a memory that searches bit-identically, for
// every key format and metric; a bad state is refused with nothing changed.
void test_state_round_trip() {
  const int64_t grid = 3, capacity = 70, dim = 11, vdim = 3, nq = 5, k = 9;
  std::mt19937 rng(4);
  std::normal_distribution<float> normal;
  std::vector<float> keys(grid * 100 * dim), values(grid * 100 * vdim), q(grid * nq * dim);
  for (float& x : keys) x = normal(rng);
  for (float& x : values) x = normal(rng);
  for (float& x : q) x = normal(rng);
  for (auto format : {knnmem::KeyFormat::kFloat32, knnmem::KeyFormat::kBFloat16,
                      knnmem::KeyFormat::kFloat16, knnmem::KeyFormat::kInt8}) {
    for (auto metric :
         {knnmem::Metric::kInnerProduct, knnmem::Metric::kCosine, knnmem::Metric::kL2}) {
      knnmem::Memory a(grid, capacity, dim, vdim, metric, format);
      a.add(keys.data(), values.data(), 60);
      a.add(keys.data(), values.data(), 40);
      const uint8_t which[grid] = {0, 1, 0};
      a.clear(which);
      a.add(keys.data(), values.data(), 5);
      const int64_t key_bytes = format == knnmem::KeyFormat::kFloat32 ? 4
                                : format == knnmem::KeyFormat::kInt8  ? 1
                                                                      : 2;
      std::vector<char> sk(grid * capacity * dim * key_bytes);
      std::vector<float> ss(grid * capacity), sv(grid * capacity * vdim);
      std::vector<int64_t> sw(grid);
      const bool int8 = format == knnmem::KeyFormat::kInt8;
      knnmem::Memory::State state{sk.data(), int8 ? ss.data() : nullptr, sv.data(), sw.data()};
      a.export_state(state);
      CHECK((sw == std::vector<int64_t>{105, 5, 105}));
      knnmem::Memory b(grid, capacity, dim, vdim, metric, format);
      b.import_state(state);
      for (double target : {0.5, 1.0}) {
        Results ra = run(a, q, nq, k, target), rb = run(b, q, nq, k, target);
        CHECK(ra.scores == rb.scores && ra.indices == rb.indices && ra.mask == rb.mask &&
              ra.keys == rb.keys && ra.values == rb.values);
      }
      // A NaN value in a live row: refused, b unchanged.
      sv[vdim * 2 + 1] = std::nanf("");
      bool threw = false;
      try {
        b.import_state(state);
      } catch (const knnmem::InvalidArgument& e) {
        threw = std::string(e.what()).rfind("values: expected finite values", 0) == 0;
      }
      CHECK(threw);
      CHECK(b.written() == a.written());
      Results ra = run(a, q, nq, k, 1.0), rb = run(b, q, nq, k, 1.0);
      CHECK(ra.scores == rb.scores && ra.indices == rb.indices);
    }
  }
}

}  // namespace

// Bin counts stay in {0} u [k, kMaxBins] however close to 1 the target is (a
// target within 1e-16 of 1 overflowed int64 and the scan never ended).
void test_bins_bounds() {
  for (const int64_t k : {int64_t{1}, int64_t{32}, int64_t{2050}, int64_t{1} << 40}) {
    for (const double target : {0.9, 0.999999, 1 - 1e-12, std::nextafter(1.0, 0.0)}) {
      const int64_t bins = knnmem::bins_for_search(k, target, knnmem::KeyFormat::kInt8);
      CHECK(bins == 0 || (bins >= k && bins <= knnmem::kMaxBins));
    }
  }
  CHECK(knnmem::bins_for_recall(2050, std::nextafter(1.0, 0.0)) == 0);
  // A search at such a target is exact and finishes.
  knnmem::Memory m(1, 64, 4, 1);
  std::vector<float> keys(64 * 4), values(64);
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  for (float& x : keys) x = normal(rng);
  m.add(keys.data(), values.data(), 64);
  const Results r =
      run(m, std::vector<float>(keys.begin(), keys.begin() + 4), 1, 64, std::nextafter(1.0, 0.0));
  CHECK(std::count(r.mask.begin(), r.mask.end(), 1) == 64);
}

// copy_checked copies everything and reports the first bad value of the copy.
void test_copy_checked() {
  std::vector<float> src(100000, 1.5f), dst(100000, 0.0f);
  CHECK(knnmem::copy_checked(src.data(), dst.data(), 100000, 2.0f) == -1);
  CHECK(dst == src);
  src[70000] = NAN;
  src[90000] = 3.0f;
  CHECK(knnmem::copy_checked(src.data(), dst.data(), 100000, 2.0f) == 70000);
  src[70000] = 1.0f;
  CHECK(knnmem::copy_checked(src.data(), dst.data(), 100000, 2.0f) == 90000);
}

int main() {
  test_bins_bounds();
  test_copy_checked();
  test_recall_model();
  test_search();
  test_clear_and_bad_k();
  test_state_round_trip();
  return knnmem_test::check_summary();
}
