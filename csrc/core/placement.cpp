#include <algorithm>
#include <climits>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "core/assert.hpp"
#include "core/fork.hpp"
#include "core/positions.hpp"
#include "knnmem/knnmem.hpp"

namespace knnmem {
namespace {

uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

struct PlacementCache {
  std::mutex mutex;
  std::map<int64_t, std::weak_ptr<const Placement>> shared;
  std::list<std::shared_ptr<const Placement>> kept;  // most recent first
  std::size_t kept_bytes = 0;
};

PlacementCache& placement_cache() {
  static PlacementCache* const cache = new PlacementCache;  // never destroyed
  return *cache;
}

}  // namespace

namespace detail {
void placements_before_fork() { placement_cache().mutex.lock(); }
void placements_after_fork() { placement_cache().mutex.unlock(); }
}  // namespace detail

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
  // Every placement in use is shared through a weak reference; besides those,
  // the most recently asked-for ones are kept alive while they take at most
  // kKeepBytes, so caller-owned rings (which ask on every call) do not rebuild
  // theirs, and deleted memories give their tables back beyond that bound.
  constexpr std::size_t kKeepBytes = std::size_t{128} << 20;
  PlacementCache* const cache = &placement_cache();
  auto bytes_of = [](const Placement& p) {
    return 2 * sizeof(int32_t) * static_cast<std::size_t>(p.capacity());
  };
  auto keep = [&](const std::shared_ptr<const Placement>& p) {  // under the mutex
    for (auto it = cache->kept.begin(); it != cache->kept.end(); ++it) {
      if (*it == p) {
        cache->kept.splice(cache->kept.begin(), cache->kept, it);
        return;
      }
    }
    if (bytes_of(*p) > kKeepBytes) return;
    cache->kept.push_front(p);
    cache->kept_bytes += bytes_of(*p);
    while (cache->kept_bytes > kKeepBytes) {
      cache->kept_bytes -= bytes_of(*cache->kept.back());
      cache->kept.pop_back();
    }
  };
  {
    std::lock_guard<std::mutex> lock(cache->mutex);
    auto it = cache->shared.find(capacity);
    if (it != cache->shared.end()) {
      if (auto p = it->second.lock()) {
        keep(p);
        return p;
      }
    }
  }
  auto built = std::make_shared<const Placement>(capacity);  // outside the lock: O(capacity)
  std::lock_guard<std::mutex> lock(cache->mutex);
  for (auto it = cache->shared.begin(); it != cache->shared.end();) {  // forget expired ones
    it = it->second.expired() ? cache->shared.erase(it) : std::next(it);
  }
  auto& slot = cache->shared[capacity];
  if (auto p = slot.lock()) built = p;  // another thread built it meanwhile
  slot = built;
  keep(built);
  return built;
}

int64_t position_of_slot(const Placement& placement, int64_t written, int64_t slot) {
  KNNMEM_ASSERT(slot >= 0 && slot < placement.capacity());
  return detail::SlotPositions(placement, written)(slot);
}

}  // namespace knnmem
