#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <shared_mutex>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "core/assert.hpp"
#include "core/store_key.hpp"
#include "core/thread_pool.hpp"
#include "cpu/kernels.hpp"
#include "knnmem/knnmem.hpp"

namespace knnmem {
namespace {

constexpr int64_t kAlign = 64;
// Rows per add task. Each row goes to a random slot (Placement): its stores
// miss a cache line per panel row of its key, so even a segment of a few
// hundred rows is worth spreading over the threads.
constexpr int64_t kAddChunk = 256;

// Product of sizes in bytes; throws std::length_error naming the sizes when
// it does not fit in a signed 64-bit count.
int64_t checked_bytes(int64_t a, int64_t b, int64_t c, const char* what) {
  int64_t ab, abc, bytes;
  if (__builtin_mul_overflow(a, b, &ab) || __builtin_mul_overflow(ab, c, &abc) ||
      __builtin_mul_overflow(abc, int64_t{4}, &bytes) || bytes > INT64_MAX - kAlign) {
    throw std::length_error(std::string(what) + ": " + std::to_string(a) + " x " +
                            std::to_string(b) + " x " + std::to_string(c) +
                            " float32 overflows a 64-bit byte count");
  }
  return bytes;
}

// Asks Linux to back a big block with transparent huge pages where the system
// leaves that to the program (THP "madvise", a common default). A search
// streams through its keys: with 4 KiB pages that is a TLB miss, and a stop of
// the hardware prefetchers, every 64 lines. Advice only: failure changes nothing.
void advise_huge_pages(void* raw, std::size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr std::size_t kHuge = std::size_t{2} << 20;
  if (bytes < 2 * kHuge) return;
  const std::size_t page = 4096;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(raw) + page - 1) & ~(page - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(raw) + bytes) & ~(page - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)raw, (void)bytes;
#endif
}

// Zeroed storage aligned to kAlign. calloc hands out untouched pages for big
// blocks, so a large memory costs RAM only as it fills.
float* alloc_zeroed(int64_t bytes, const char* what) {
  const auto total = static_cast<std::size_t>(bytes + kAlign + sizeof(void*));
  void* raw = std::calloc(total, 1);
  if (raw == nullptr) {
    throw AllocationError(std::string(what) + ": cannot allocate " + std::to_string(bytes) +
                          " bytes");
  }
  advise_huge_pages(raw, total);
  auto start = reinterpret_cast<uintptr_t>(raw) + sizeof(void*);
  auto aligned = (start + kAlign - 1) & ~static_cast<uintptr_t>(kAlign - 1);
  reinterpret_cast<void**>(aligned)[-1] = raw;
  return reinterpret_cast<float*>(aligned);
}

void free_aligned(float* p) {
  if (p != nullptr) std::free(reinterpret_cast<void**>(p)[-1]);
}

}  // namespace

void add(const MutableMemoryView& m, const float* new_keys, const float* new_values,
         int64_t num_rows) {
  KNNMEM_ASSERT(num_rows >= 0 && m.placement && m.placement->capacity() == m.capacity);
  if (num_rows == 0 || m.grid == 0) return;
  // The counters are read once (a caller-owned ring may be changed by another
  // thread meanwhile): every slot written below derives from this snapshot,
  // and the new counts are stored from it, not re-read.
  std::vector<int64_t> written(static_cast<std::size_t>(m.grid));
  for (int64_t g = 0; g < m.grid; ++g) written[g] = m.written[m.cell(g)];
  for (int64_t g = 0; g < m.grid; ++g) {
    if (written[g] < 0 || written[g] > INT64_MAX - num_rows) {
      throw InvalidArgument("written: expected counts in [0, " +
                            std::to_string(INT64_MAX - num_rows) + "] to add " +
                            std::to_string(num_rows) + " rows, got " + std::to_string(written[g]) +
                            " at index [" + std::to_string(g) + "]");
    }
  }
  // Only the last `capacity` rows of the segment survive; they map to
  // distinct slots, so chunks of them can be written in parallel.
  const int64_t first = std::max<int64_t>(0, num_rows - m.capacity);
  const int64_t chunks = (num_rows - first + kAddChunk - 1) / kAddChunk;
  const int32_t* slot_of = m.placement->slot_of();
  const int64_t padded = padded_capacity(m.capacity);
  detail::parallel_for(static_cast<std::size_t>(m.grid * chunks), [&](std::size_t i) {
    const int64_t g = static_cast<int64_t>(i) / chunks;
    const int64_t t0 = first + (static_cast<int64_t>(i) % chunks) * kAddChunk;
    const int64_t t1 = std::min(num_rows, t0 + kAddChunk);
    const int64_t base = written[g];
    const int64_t c = m.cell(g);  // where memory g is stored
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t slot = slot_of[(base + t) % m.capacity];
      const float* key = new_keys + (g * num_rows + t) * m.key_dim;
      float stored_sq;
      if (m.key_layout == KeyLayout::kRows) {
        std::memcpy(static_cast<float*>(m.keys) + (c * m.capacity + slot) * m.key_stride, key,
                    sizeof(float) * m.key_dim);
        stored_sq = m.key_aux ? cpu::squared_norm(key, m.key_dim) : 0.0f;
      } else {
        const int64_t at = c * padded + slot;
        void* panel = static_cast<uint32_t*>(m.keys) +
                      (at - slot % kPanelSlots) * key_words(m.key_format, m.key_dim);
        const bool int8 = m.key_format == KeyFormat::kInt8;
        stored_sq = detail::store_key(m.key_format, key, m.key_dim, panel, slot % kPanelSlots,
                                      int8 ? m.key_scale + at : nullptr,
                                      int8 ? m.key_sum + at : nullptr, m.key_aux != nullptr);
      }
      std::memcpy(m.values + (c * m.capacity + slot) * m.value_stride,
                  new_values + (g * num_rows + t) * m.value_dim, sizeof(float) * m.value_dim);
      if (m.key_aux) m.key_aux[c * padded + slot] = detail::aux_of(m.aux_metric, stored_sq);
    }
  });
  for (int64_t g = 0; g < m.grid; ++g) m.written[m.cell(g)] = written[g] + num_rows;
}

void check_cells(const int64_t* cells, int64_t count, int64_t grid, bool distinct) {
  if (count < 0) throw InvalidArgument("which: expected a count >= 0 of memories");
  std::vector<int64_t> seen_at;
  if (distinct) seen_at.assign(static_cast<std::size_t>(grid), -1);
  for (int64_t i = 0; i < count; ++i) {
    const int64_t c = cells[i];
    if (c < 0 || c >= grid) {
      throw InvalidArgument("which: memory " + std::to_string(c) + " at position " +
                            std::to_string(i) + " is outside the grid of " + std::to_string(grid) +
                            " memories");
    }
    if (distinct) {
      if (seen_at[c] >= 0) {
        throw InvalidArgument("which: memory " + std::to_string(c) + " is selected twice (at " +
                              std::to_string(seen_at[c]) + " and " + std::to_string(i) +
                              "); an add writes each memory once");
      }
      seen_at[c] = i;
    }
  }
}

int64_t copy_checked(const float* src, float* dst, int64_t n, float limit) {
  constexpr int64_t kPiece = 16384;  // floats per task: copied, then checked while cached
  const int64_t pieces = (n + kPiece - 1) / kPiece;
  std::vector<int64_t> first_bad(static_cast<std::size_t>(pieces), -1);
  detail::parallel_for(static_cast<std::size_t>(pieces), [&](std::size_t i) {
    const int64_t begin = static_cast<int64_t>(i) * kPiece;
    const int64_t end = std::min(n, begin + kPiece);
    std::memcpy(dst + begin, src + begin, sizeof(float) * static_cast<std::size_t>(end - begin));
    for (int64_t j = begin; j < end; ++j) {
      if (!(std::fabs(dst[j]) <= limit)) {  // also NaN
        first_bad[i] = j;
        return;
      }
    }
  });
  for (const int64_t bad : first_bad) {
    if (bad >= 0) return bad;
  }
  return -1;
}

Memory::Memory(int64_t grid, int64_t capacity, int64_t key_dim, int64_t value_dim, Metric metric,
               KeyFormat key_format)
    : grid_(grid),
      capacity_(capacity),
      key_dim_(key_dim),
      value_dim_(value_dim),
      metric_(metric),
      key_format_(key_format) {
  auto positive = [](int64_t v, const char* name) {
    if (v < 1) {
      throw InvalidArgument(std::string(name) + ": expected an integer >= 1, got " +
                            std::to_string(v));
    }
  };
  positive(grid, "shape");
  positive(capacity, "capacity");
  positive(key_dim, "key_dim");
  positive(value_dim, "value_dim");
  // Check every size before allocating anything.
  const int64_t padded = padded_capacity(capacity);
  const int64_t key_bytes = checked_bytes(grid, padded, key_words(key_format, key_dim), "keys");
  const int64_t value_bytes = checked_bytes(grid, capacity, value_dim, "values");
  const int64_t aux_bytes = checked_bytes(grid, padded, 1, "norms");
  // Storage first, then the placement table (8 bytes a slot, shared): a memory
  // that cannot be allocated leaves nothing behind.
  try {
    keys_ = alloc_zeroed(key_bytes, "keys");
    values_ = alloc_zeroed(value_bytes, "values");
    key_aux_ = alloc_zeroed(aux_bytes, "norms");
    if (key_format == KeyFormat::kInt8) {
      key_scale_ = alloc_zeroed(aux_bytes, "key scales");
      key_sum_ = reinterpret_cast<int32_t*>(alloc_zeroed(aux_bytes, "key sums"));
    }
    try {
      placement_ = Placement::shared(capacity);
    } catch (const std::bad_alloc&) {
      throw AllocationError("placement: cannot allocate " + std::to_string(8 * capacity) +
                            " bytes");
    }
  } catch (...) {
    free_aligned(static_cast<float*>(keys_));
    free_aligned(values_);
    free_aligned(key_aux_);
    free_aligned(key_scale_);
    free_aligned(reinterpret_cast<float*>(key_sum_));
    throw;
  }
  written_.assign(static_cast<std::size_t>(grid), 0);
}

void RWLock::lock_shared() {
  std::unique_lock<std::mutex> lock(mutex_);
  changed_.wait(lock, [&] { return !writing_ && writers_waiting_ == 0; });
  ++readers_;
}

void RWLock::unlock_shared() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (--readers_ == 0) changed_.notify_all();
}

void RWLock::lock() {
  std::unique_lock<std::mutex> lock(mutex_);
  ++writers_waiting_;
  changed_.wait(lock, [&] { return !writing_ && readers_ == 0; });
  --writers_waiting_;
  writing_ = true;
}

void RWLock::unlock() {
  std::lock_guard<std::mutex> lock(mutex_);
  writing_ = false;
  changed_.notify_all();
}

Memory::~Memory() {
  free_aligned(static_cast<float*>(keys_));
  free_aligned(values_);
  free_aligned(key_aux_);
  free_aligned(key_scale_);
  free_aligned(reinterpret_cast<float*>(key_sum_));
}

int64_t Memory::nbytes() const {
  const int64_t per_slot = key_words(key_format_, key_dim_) + 1 +      // keys, norm term
                           (key_format_ == KeyFormat::kInt8 ? 2 : 0);  // scale, sum
  return 4 * grid_ * (padded_capacity(capacity_) * per_slot + capacity_ * value_dim_) + 8 * grid_ +
         8 * capacity_;
}

MutableMemoryView Memory::view_unlocked() const {
  MutableMemoryView v;
  v.keys = keys_;
  v.values = values_;
  v.key_aux = key_aux_;
  v.key_scale = key_scale_;
  v.key_sum = key_sum_;
  v.written = const_cast<int64_t*>(written_.data());  // written only under the exclusive lock
  v.grid = grid_;
  v.capacity = capacity_;
  v.key_dim = key_dim_;
  v.key_stride = key_dim_;
  v.value_dim = value_dim_;
  v.value_stride = value_dim_;
  v.key_layout = KeyLayout::kPanels;
  v.key_format = key_format_;
  v.aux_metric = metric_;
  v.placement = placement_.get();
  return v;
}

void Memory::add(const float* new_keys, const float* new_values, int64_t num_rows,
                 const int64_t* cells, int64_t num_cells) {
  std::unique_lock<RWLock> lock(mutex_);
  MutableMemoryView view = view_unlocked();
  if (cells) {
    check_cells(cells, num_cells, grid_, true);
    view.cells = cells;
    view.grid = num_cells;
  }
  knnmem::add(view, new_keys, new_values, num_rows);
}

void Memory::search(const float* queries, int64_t num_queries, int64_t k, double recall_target,
                    const SearchOutput& out, const int64_t* cells, int64_t num_cells) const {
  std::shared_lock<RWLock> lock(mutex_);
  const SearchOptions options{k, recall_target, metric_};
  MemoryView view = view_unlocked().as_const();
  if (cells) {
    check_cells(cells, num_cells, grid_, false);
    view.cells = cells;
    view.grid = num_cells;
  }
  knnmem::search(view, queries, num_queries, options, out);
}

void Memory::clear(const uint8_t* clear_mask) {
  std::unique_lock<RWLock> lock(mutex_);
  for (int64_t g = 0; g < grid_; ++g) {
    if (clear_mask == nullptr || clear_mask[g]) written_[g] = 0;
  }
}

std::vector<int64_t> Memory::written() const {
  std::shared_lock<RWLock> lock(mutex_);
  return written_;
}

std::vector<int64_t> Memory::count() const {
  std::shared_lock<RWLock> lock(mutex_);
  std::vector<int64_t> out(written_.size());
  for (std::size_t g = 0; g < out.size(); ++g) out[g] = std::min(written_[g], capacity_);
  return out;
}

}  // namespace knnmem
