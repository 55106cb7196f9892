#include <algorithm>
#include <climits>
#include <map>
#include <mutex>
#include <string>

#include "core/assert.hpp"
#include "knnmem/knnmem.hpp"

namespace knnmem {
namespace {

uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

}  // namespace

Placement::Placement(int64_t capacity) {
  if (capacity < 1 || capacity > INT32_MAX) {
    throw InvalidArgument("capacity: expected an integer in [1, 2147483647], got " +
                          std::to_string(capacity));
  }
  slot_of_.resize(static_cast<std::size_t>(capacity));
  offset_of_.resize(static_cast<std::size_t>(capacity));
  for (int64_t base = 0; base < capacity; base += kPlacementBlock) {
    const int64_t size = std::min(kPlacementBlock, capacity - base);
    int32_t* block = slot_of_.data() + base;
    for (int64_t i = 0; i < size; ++i) block[i] = static_cast<int32_t>(base + i);
    uint64_t state = 0x6B6E6E6D656D0000ull ^ static_cast<uint64_t>(base / kPlacementBlock);
    for (int64_t i = size - 1; i > 0; --i) {  // Fisher-Yates
      const int64_t j = static_cast<int64_t>(splitmix64(state) % static_cast<uint64_t>(i + 1));
      std::swap(block[i], block[j]);
    }
  }
  for (int64_t r = 0; r < capacity; ++r) offset_of_[slot_of_[r]] = static_cast<int32_t>(r);
}

std::shared_ptr<const Placement> Placement::shared(int64_t capacity) {
  // A process uses few capacities; the cache is bounded all the same.
  constexpr std::size_t kMaxCached = 16;
  static std::mutex mutex;
  static std::map<int64_t, std::shared_ptr<const Placement>> cache;
  {
    std::lock_guard<std::mutex> lock(mutex);
    auto it = cache.find(capacity);
    if (it != cache.end()) return it->second;
  }
  auto built = std::make_shared<const Placement>(capacity);
  std::lock_guard<std::mutex> lock(mutex);
  if (cache.size() >= kMaxCached) cache.erase(cache.begin());
  return cache.emplace(capacity, built).first->second;
}

int64_t position_of_slot(const Placement& placement, int64_t written, int64_t slot) {
  const int64_t capacity = placement.capacity();
  KNNMEM_ASSERT(slot >= 0 && slot < capacity);
  const int64_t r = placement.offset_of()[slot];
  if (r >= written) return -1;
  // The newest row p <= written - 1 with p mod capacity == r.
  return r + capacity * ((written - 1 - r) / capacity);
}

}  // namespace knnmem
