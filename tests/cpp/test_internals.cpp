// C++ tests of core internals that the public header does not show: the
// block cache behind the search's working buffers and the result arrays.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <thread>
#include <vector>

#include "check.hpp"
#include "core/block_cache.hpp"

namespace {

using knnmem::detail::BlockCache;
using knnmem::detail::ScratchBlock;
constexpr std::size_t kPage = 4096;

// A freed block comes back for a request it fits (at most twice its size),
// page-aligned and rounded up to whole pages.
void test_reuse() {
  BlockCache cache(1 << 20, false);
  BlockCache::Block* a = cache.take(1000);
  CHECK(a->bytes == kPage);
  CHECK(reinterpret_cast<uintptr_t>(a->data) % kPage == 0);
  std::memset(a->data, 7, a->bytes);  // all of it is usable
  void* data = a->data;
  cache.give(a);
  BlockCache::Block* b = cache.take(kPage);
  CHECK(b->data == data);
  cache.give(b);
  // Four pages are more than twice one page: a one-page request gets a new block.
  BlockCache::Block* big = cache.take(4 * kPage);
  void* big_data = big->data;
  cache.give(big);
  BlockCache::Block* small = cache.take(kPage);
  CHECK(small->data == data);  // the kept one-page block, not the four-page one
  BlockCache::Block* small2 = cache.take(kPage);
  CHECK(small2->data != big_data && small2->data != data);
  cache.give(small);
  cache.give(small2);
  BlockCache::Block* again = cache.take(3 * kPage);  // 4 pages <= 2 x 3 pages
  CHECK(again->data == big_data);
  cache.give(again);
}

// A size that cannot be rounded up to whole pages is refused with bad_alloc (a size
// the system cannot give is too, by aligned_alloc; not tried here: ASan aborts on it).
void test_refusal() {
  BlockCache cache(1 << 20, false);
  for (std::size_t bytes : {SIZE_MAX, SIZE_MAX - 100}) {
    bool refused = false;
    try {
      cache.give(cache.take(bytes));
    } catch (const std::bad_alloc&) {
      refused = true;
    }
    CHECK(refused);
  }
}

// Beyond keep_bytes the oldest kept blocks are freed; the newest come back first.
void test_keep_limit() {
  BlockCache cache(8 * kPage, false);
  BlockCache::Block* a = cache.take(4 * kPage);
  BlockCache::Block* b = cache.take(4 * kPage);
  BlockCache::Block* c = cache.take(4 * kPage);
  void* bd = b->data;
  void* cd = c->data;
  cache.give(a);
  cache.give(b);
  cache.give(c);  // 12 pages given, 8 kept: a is freed
  BlockCache::Block* x = cache.take(4 * kPage);
  BlockCache::Block* y = cache.take(4 * kPage);
  CHECK(x->data == cd);
  CHECK(y->data == bd);
  cache.give(x);
  cache.give(y);
}

// A ScratchBlock keeps its block while it is big enough, and gives it back when it goes.
void test_scratch_block() {
  void* first;
  {
    ScratchBlock s;
    first = s.reserve(10000);
    CHECK(first != nullptr && reinterpret_cast<uintptr_t>(first) % kPage == 0);
    CHECK(s.reserve(3 * kPage) == first);  // 10000 bytes round up to 3 pages
    void* bigger = s.reserve(1 << 20);
    CHECK(bigger != first);
    std::memset(bigger, 1, 1 << 20);
    ScratchBlock moved = std::move(s);
    CHECK(moved.reserve(1 << 20) == bigger);
  }
  ScratchBlock t;
  CHECK(t.reserve(10000) == first);  // given back by the first reserve's replacement
}

// Threads taking and giving blocks of mixed sizes at once (run under TSan in CI).
void test_threads() {
  BlockCache cache(64 * kPage, false);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&cache, t] {
      for (int i = 0; i < 2000; ++i) {
        const std::size_t bytes = kPage * static_cast<std::size_t>(1 + (i + t) % 5);
        BlockCache::Block* b = cache.take(bytes);
        static_cast<char*>(b->data)[bytes - 1] = static_cast<char>(i);
        cache.give(b);
      }
    });
  }
  for (auto& th : threads) th.join();
  BlockCache::Block* b = cache.take(kPage);
  CHECK(b->bytes >= kPage && b->bytes <= 2 * kPage);
  cache.give(b);
}

}  // namespace

int main() {
  test_reuse();
  test_refusal();
  test_keep_limit();
  test_scratch_block();
  test_threads();
  return knnmem_test::check_summary();
}
