// Concurrency stress test of knnmem::Memory: adders, searchers, a clearer and a
// state exporter share one memory for a bounded time, with invariants checked on
// every result. Built and run plainly by tests/test_cpp.py and under ThreadSanitizer
// and AddressSanitizer + UBSan by .ci/sanitize.
//
// Every row is self-describing: value = (id, cell, id / 2), key = a fixed function
// of the id, so any result can be checked on its own whatever the interleaving.
//
// Usage: knnmem_stress_test [seconds per key format, default 1]
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "knnmem/knnmem.hpp"

namespace {

constexpr int64_t kGrid = 4, kCap = 300, kKeyDim = 9, kValueDim = 3;
constexpr int64_t kMaxId = int64_t{1} << 22;  // ids stay exact in float32

std::mutex report_mutex;
std::atomic<int> failures{0};

void fail(const std::string& what) {
  std::lock_guard<std::mutex> lock(report_mutex);
  if (failures++ < 20) std::printf("FAILED: %s\n", what.c_str());
}

#define EXPECT(cond, what)                             \
  do {                                                 \
    if (!(cond)) fail(std::string(what) + ": " #cond); \
  } while (0)

float key_at(int64_t id, int64_t d) {
  if (d == 0) return static_cast<float>(id) / static_cast<float>(kMaxId);
  uint64_t x = static_cast<uint64_t>(id) * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(d);
  x ^= x >> 31;
  x *= 0xBF58476D1CE4E5B9ull;
  x ^= x >> 29;
  return (static_cast<float>(x >> 40) - 8388608.0f) / 8388608.0f;  // [-1, 1), exact
}

struct Shared {
  knnmem::Memory memory;
  knnmem::KeyFormat format;
  std::atomic<int64_t> next_id{0};
  std::atomic<int64_t> total[kGrid];  // rows handed to add per cell, counted before the add
  std::atomic<bool> stop{false};
  std::atomic<int64_t> adds{0}, searches{0}, clears{0}, exports{0}, found{0};

  Shared(knnmem::KeyFormat f)
      : memory(kGrid, kCap, kKeyDim, kValueDim, knnmem::Metric::kL2, f), format(f) {
    for (auto& t : total) t = 0;
  }
};

// Checks that (key, value) is a whole row added to `cell`; returns its id.
int64_t check_row(const Shared& s, const float* key, const float* value, int64_t cell,
                  const char* where) {
  const int64_t id = static_cast<int64_t>(value[0]);
  EXPECT(value[0] == static_cast<float>(id) && id >= 0 && id < s.next_id.load(), where);
  EXPECT(value[1] == static_cast<float>(cell), where);
  EXPECT(value[2] == static_cast<float>(id) * 0.5f, where);
  if (key != nullptr && s.format == knnmem::KeyFormat::kFloat32) {
    for (int64_t d = 0; d < kKeyDim; ++d) EXPECT(key[d] == key_at(id, d), where);
  }
  return id;
}

void adder(Shared& s, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<float> keys, values;
  while (!s.stop.load()) {
    const int64_t t = rng() % 10 == 0 ? kCap + 7 : 1 + rng() % 40;
    const int64_t first = s.next_id.fetch_add(kGrid * t);
    if (first + kGrid * t >= kMaxId) return;
    keys.resize(kGrid * t * kKeyDim);
    values.resize(kGrid * t * kValueDim);
    for (int64_t g = 0; g < kGrid; ++g) {
      for (int64_t r = 0; r < t; ++r) {
        const int64_t id = first + g * t + r;
        for (int64_t d = 0; d < kKeyDim; ++d) keys[(g * t + r) * kKeyDim + d] = key_at(id, d);
        float* v = &values[(g * t + r) * kValueDim];
        v[0] = static_cast<float>(id);
        v[1] = static_cast<float>(g);
        v[2] = static_cast<float>(id) * 0.5f;
      }
      s.total[g] += t;
    }
    s.memory.add(keys.data(), values.data(), t);
    ++s.adds;
  }
}

void searcher(Shared& s, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  const int64_t ks[] = {1, 7, 32, kCap};
  const double targets[] = {0.5, 0.9, 1.0};
  while (!s.stop.load()) {
    const int64_t k = ks[rng() % 4];
    const int64_t nq = 1 + rng() % 6;
    const double target = targets[rng() % 3];
    std::vector<float> q(kGrid * nq * kKeyDim);
    for (float& x : q) x = normal(rng);
    const int64_t n = kGrid * nq * k;
    std::vector<float> scores(n), keys(n * kKeyDim), values(n * kValueDim);
    std::vector<int64_t> indices(n);
    std::unique_ptr<bool[]> mask(new bool[n]);
    s.memory.search(q.data(), nq, k, target,
                    {scores.data(), indices.data(), mask.get(), keys.data(), values.data()});
    for (int64_t g = 0; g < kGrid; ++g) {
      const int64_t total = s.total[g].load();  // read after the search returned
      for (int64_t i = 0; i < nq; ++i) {
        std::set<int64_t> seen;
        bool ended = false;
        for (int64_t j = 0; j < k; ++j) {
          const int64_t o = (g * nq + i) * k + j;
          if (!mask[o]) {
            ended = true;
            EXPECT(indices[o] == -1 && std::isinf(scores[o]) && scores[o] < 0, "empty entry");
            EXPECT(values[o * kValueDim] == 0.0f && keys[o * kKeyDim] == 0.0f, "empty entry");
            continue;
          }
          EXPECT(!ended, "found entries come first");
          check_row(s, &keys[o * kKeyDim], &values[o * kValueDim], g, "search result");
          EXPECT(indices[o] >= 0 && indices[o] < total, "position below rows added");
          EXPECT(seen.insert(indices[o]).second, "positions distinct");
          if (j > 0 && mask[o - 1]) EXPECT(scores[o - 1] >= scores[o], "best first");
          ++s.found;
        }
      }
    }
    ++s.searches;
  }
}

void clearer(Shared& s, uint32_t seed) {
  std::mt19937 rng(seed);
  while (!s.stop.load()) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
    uint8_t which[kGrid];
    for (auto& w : which) w = rng() % 3 == 0;
    s.memory.clear(rng() % 10 == 0 ? nullptr : which);
    // Two calls, so an add may come between them: each on its own is checked.
    const std::vector<int64_t> written = s.memory.written(), count = s.memory.count();
    for (int64_t g = 0; g < kGrid; ++g) {
      EXPECT(written[g] >= 0 && written[g] <= s.total[g].load(), "written counter");
      EXPECT(count[g] >= 0 && count[g] <= kCap, "count");
    }
    ++s.clears;
  }
}

// export_state (what save uses) concurrently with everything else: a consistent
// snapshot of whole rows, each in the cell it was added to.
void exporter(Shared& s) {
  const int64_t key_bytes = s.format == knnmem::KeyFormat::kFloat32 ? 4
                            : s.format == knnmem::KeyFormat::kInt8  ? 1
                                                                    : 2;
  std::vector<char> keys(kGrid * kCap * kKeyDim * key_bytes);
  std::vector<float> scale(kGrid * kCap), values(kGrid * kCap * kValueDim);
  std::vector<int64_t> written(kGrid);
  while (!s.stop.load()) {
    const bool int8 = s.format == knnmem::KeyFormat::kInt8;
    s.memory.export_state(
        {keys.data(), int8 ? scale.data() : nullptr, values.data(), written.data()});
    for (int64_t g = 0; g < kGrid; ++g) {
      const int64_t count = std::min(written[g], kCap);
      std::set<int64_t> ids;
      for (int64_t i = 0; i < kCap; ++i) {
        const float* v = &values[(g * kCap + i) * kValueDim];
        if (i >= count) {
          EXPECT(v[0] == 0.0f && v[1] == 0.0f, "exported rows past the count are zero");
          continue;
        }
        const float* k =
            reinterpret_cast<const float*>(&keys[(g * kCap + i) * kKeyDim * key_bytes]);
        EXPECT(ids.insert(check_row(s, k, v, g, "exported row")).second, "exported ids distinct");
      }
    }
    ++s.exports;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
}

void run(knnmem::KeyFormat format, double seconds) {
  Shared s(format);
  std::vector<std::thread> threads;
  threads.emplace_back(adder, std::ref(s), 1u);
  threads.emplace_back(adder, std::ref(s), 2u);
  threads.emplace_back(searcher, std::ref(s), 3u);
  threads.emplace_back(searcher, std::ref(s), 4u);
  threads.emplace_back(clearer, std::ref(s), 5u);
  threads.emplace_back(exporter, std::ref(s));
  std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
  s.stop = true;
  for (auto& t : threads) t.join();
  std::printf("%s: %lld adds, %lld searches (%lld entries), %lld clears, %lld exports\n",
              knnmem::key_format_name(format), static_cast<long long>(s.adds.load()),
              static_cast<long long>(s.searches.load()), static_cast<long long>(s.found.load()),
              static_cast<long long>(s.clears.load()), static_cast<long long>(s.exports.load()));
  EXPECT(s.adds > 0 && s.searches > 0 && s.clears > 0 && s.exports > 0, "every role ran");
  EXPECT(s.found > 0, "searches found rows");
  // At rest: an exact search of k = capacity returns exactly the live positions.
  std::vector<float> q(kGrid * kKeyDim, 0.25f), scores(kGrid * kCap);
  std::vector<float> keys(kGrid * kCap * kKeyDim), values(kGrid * kCap * kValueDim);
  std::vector<int64_t> indices(kGrid * kCap);
  std::unique_ptr<bool[]> mask(new bool[kGrid * kCap]);
  s.memory.search(q.data(), 1, kCap, 1.0,
                  {scores.data(), indices.data(), mask.get(), keys.data(), values.data()});
  const std::vector<int64_t> written = s.memory.written();
  for (int64_t g = 0; g < kGrid; ++g) {
    const int64_t count = std::min(written[g], kCap);
    std::vector<int64_t> got;
    for (int64_t j = 0; j < kCap; ++j) {
      if (mask[g * kCap + j]) got.push_back(indices[g * kCap + j]);
    }
    std::sort(got.begin(), got.end());
    bool ok = static_cast<int64_t>(got.size()) == count;
    for (int64_t j = 0; ok && j < count; ++j) ok = got[j] == written[g] - count + j;
    EXPECT(ok, "at rest, exact search returns the live positions");
  }
}

}  // namespace

int main(int argc, char** argv) {
  const double seconds = argc > 1 ? std::atof(argv[1]) : 1.0;
  knnmem::set_num_threads(3);
  for (auto format : {knnmem::KeyFormat::kFloat32, knnmem::KeyFormat::kBFloat16,
                      knnmem::KeyFormat::kFloat16, knnmem::KeyFormat::kInt8}) {
    run(format, seconds);
  }
  std::printf(failures ? "%d checks failed\n" : "all checks passed\n", failures.load());
  return failures ? EXIT_FAILURE : EXIT_SUCCESS;
}
