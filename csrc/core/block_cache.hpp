// Big buffers kept between calls, so that a loop of calls needing the same
// buffers every time reuses memory whose pages are already mapped.
//
// Fresh memory of a few hundred kilobytes or more comes from the kernel (malloc
// maps it, or takes it from a heap that free() trimmed), and the first write to
// each of its pages faults. A search of M1 with int8 keys spent ~15% of its time
// in those faults for its bins alone (glibc trims a thread's heap as soon as
// the search frees them). A BlockCache keeps freed blocks, up to a limit, and
// hands them out again.
#pragma once

#include <cstddef>
#include <list>
#include <mutex>

namespace knnmem::detail {

class BlockCache {
 public:
  struct Block {
    void* data;
    std::size_t bytes;  // a multiple of the page size
  };

  // Keeps at most keep_bytes of freed blocks. huge_pages: new blocks are
  // advised to the kernel as huge-page candidates (advice only).
  BlockCache(std::size_t keep_bytes, bool huge_pages)
      : keep_bytes_(keep_bytes), huge_pages_(huge_pages) {}
  ~BlockCache();  // frees the kept blocks (blocks taken must have been given back)
  BlockCache(const BlockCache&) = delete;
  BlockCache& operator=(const BlockCache&) = delete;

  // A kept block of at least `bytes` (rounded up to pages) and at most twice
  // that, else a new one. Throws std::bad_alloc.
  Block* take(std::size_t bytes);
  // Keeps a block (the newest first), freeing the oldest beyond keep_bytes.
  void give(Block* block);

  // fork(): the mutex taken before, released (parent) or made anew (child) after.
  void before_fork() { mutex_.lock(); }
  void after_fork(bool child);

 private:
  std::size_t keep_bytes_;
  bool huge_pages_;
  std::mutex mutex_;
  std::list<Block*> free_;
  std::size_t kept_ = 0;
};

// The search's working buffers (bins and candidate buffers of its tasks):
// process-wide, never destroyed, at most 64 MiB kept; quiesced by the fork
// handlers (core/fork.cpp) after the memories' locks.
BlockCache& scratch_cache();

// A block of scratch_cache() for one owner, given back when it goes.
class ScratchBlock {
 public:
  ScratchBlock() = default;
  ScratchBlock(ScratchBlock&& other) noexcept : block_(other.block_) { other.block_ = nullptr; }
  ScratchBlock& operator=(ScratchBlock&& other) noexcept;
  ScratchBlock(const ScratchBlock&) = delete;
  ScratchBlock& operator=(const ScratchBlock&) = delete;
  ~ScratchBlock() { reset(); }

  // At least `bytes` (page-aligned; contents undefined), the block held
  // already if it is big enough.
  void* reserve(std::size_t bytes);
  void reset();

 private:
  BlockCache::Block* block_ = nullptr;
};

}  // namespace knnmem::detail
