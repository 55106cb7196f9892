#include "core/block_cache.hpp"

#include <cstdint>
#include <cstdlib>
#include <new>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace knnmem::detail {
namespace {

constexpr std::size_t kPage = 4096;
constexpr std::size_t kScratchKeepBytes = std::size_t{64} << 20;

}  // namespace

BlockCache::~BlockCache() {
  for (Block* b : free_) {
    std::free(b->data);
    delete b;
  }
}

BlockCache::Block* BlockCache::take(std::size_t bytes) {
  if (bytes > SIZE_MAX - kPage) throw std::bad_alloc();  // would wrap when rounded up
  const std::size_t rounded = (bytes + kPage - 1) / kPage * kPage;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    auto best = free_.end();
    for (auto it = free_.begin(); it != free_.end(); ++it) {
      if ((*it)->bytes >= rounded && (*it)->bytes / 2 <= rounded &&
          (best == free_.end() || (*it)->bytes < (*best)->bytes)) {
        best = it;
      }
    }
    if (best != free_.end()) {
      Block* b = *best;
      kept_ -= b->bytes;
      free_.erase(best);
      return b;
    }
  }
  void* data = std::aligned_alloc(kPage, rounded == 0 ? kPage : rounded);
  if (data == nullptr) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (huge_pages_) madvise(data, rounded, MADV_HUGEPAGE);  // advice only
#endif
  Block* block = new (std::nothrow) Block{data, rounded == 0 ? kPage : rounded};
  if (block == nullptr) {
    std::free(data);
    throw std::bad_alloc();
  }
  return block;
}

void BlockCache::give(Block* block) {
  std::vector<Block*> drop;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    free_.push_front(block);
    kept_ += block->bytes;
    while (kept_ > keep_bytes_) {
      drop.push_back(free_.back());
      kept_ -= free_.back()->bytes;
      free_.pop_back();
    }
  }
  for (Block* b : drop) {
    std::free(b->data);
    delete b;
  }
}

void BlockCache::after_fork(bool child) {
  if (child) {
    new (&mutex_) std::mutex;  // the parent's other threads are not in this process
  } else {
    mutex_.unlock();
  }
}

BlockCache& scratch_cache() {
  static BlockCache* const cache = new BlockCache(kScratchKeepBytes, false);  // never destroyed
  return *cache;
}

ScratchBlock& ScratchBlock::operator=(ScratchBlock&& other) noexcept {
  if (this != &other) {
    reset();
    block_ = other.block_;
    other.block_ = nullptr;
  }
  return *this;
}

void* ScratchBlock::reserve(std::size_t bytes) {
  if (block_ != nullptr && block_->bytes >= bytes) return block_->data;
  reset();
  block_ = scratch_cache().take(bytes);
  return block_->data;
}

void ScratchBlock::reset() {
  if (block_ != nullptr) scratch_cache().give(block_);
  block_ = nullptr;
}

}  // namespace knnmem::detail
