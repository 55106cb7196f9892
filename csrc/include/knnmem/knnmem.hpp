// knnmem: a grid of FIFO key/value memories with approximate top-k search.
//
// This is the whole public C++ surface. It has no Python and no framework types:
// front ends (the pybind11 module, XLA FFI handlers, PyTorch ops) validate user
// input and then call these functions on their own buffers.
//
// Two levels:
//   * Views + free functions (`search`, `add`): kernels on borrowed buffers in
//     the ring layout described below. The caller owns the storage.
//   * `Memory`: owns aligned storage for a grid of memories, the write
//     counters, and a reader/writer lock; forwards to the free functions.
//
// Ring layout of one grid of G memories, each with `capacity` slots:
//   keys     [G][capacity][key_stride]   float32 rows (KeyLayout::kRows), or
//            [G][panels][key_dim][16]    panels of 16 slots (KeyLayout::kPanels,
//                                        panels = ceil(capacity / 16); the layout
//                                        the SIMD kernels read, used by Memory)
//   values   [G][capacity][value_stride] float32
//   written  [G]                         int64, rows added since the last clear
//   key_aux  [G][16 * panels]            optional per-slot norm term of the metric
//                                        (1/|k| for cosine, |k|^2 for l2)
// Row p of a memory's stream (p = 0 is the first row added since the last
// clear) lives in slot placement(p mod capacity), see `Placement`.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

namespace knnmem {

// A user error: bad arguments to a public function. Front ends turn it into a
// ValueError (or the framework's error type). Internal invariants use
// KNNMEM_ASSERT (abort), never this.
class InvalidArgument : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// Storage that could not be allocated; the message names what and how much.
// Front ends turn it into MemoryError.
class AllocationError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {
struct ForkHandlers;
}

// A reader/writer lock that lets a waiting writer in before new readers, so a
// stream of searches cannot starve add() or clear(). Every RWLock is taken
// before a fork() and set up anew, free, in the child (csrc/core/fork.cpp).
class RWLock {
 public:
  RWLock();
  ~RWLock();
  RWLock(const RWLock&) = delete;
  RWLock& operator=(const RWLock&) = delete;
  void lock_shared();
  void unlock_shared();
  void lock();
  void unlock();

 private:
  friend struct detail::ForkHandlers;
  std::mutex mutex_;
  std::condition_variable changed_;
  int64_t readers_ = 0;
  int64_t writers_waiting_ = 0;
  bool writing_ = false;
};

enum class Metric : int {
  kInnerProduct = 0,  // score = <q, k>
  kCosine = 1,        // score = <q, k> / (|q| |k|); 0 where either norm is 0
  kL2 = 2,            // score = -|q - k|^2 (higher is nearer)
};

// Parses "ip" | "cosine" | "l2"; throws InvalidArgument naming `metric`.
Metric parse_metric(const std::string& name);
const char* metric_name(Metric metric);

// ---------------------------------------------------------------------------
// Recall model of the strided-bin partial reduction (TPU-KNN, Chern et al.).
// With L bins and the true top-k in independent uniformly random bins, the
// expected fraction of the top-k that survives is
//     r(L) = (L / k) * (1 - (1 - 1/L)^k).
double expected_recall(int64_t num_bins, int64_t k);
// The argument rules of a search, owned here and applied by every front end
// (the pybind11 module, the XLA FFI handlers, the CUDA planner, and through
// knnmem._core the Python layers): k in [1, capacity], recall_target in (0, 1].
// Throws InvalidArgument naming the argument, with the message users see.
void check_search_options(int64_t k, double recall_target, int64_t capacity);

// Smallest L >= k with expected_recall(L, k) >= recall_target, or 0 (exact
// search) when recall_target >= 1 or when that L would exceed kMaxBins: no
// memory has that many slots (capacity <= 2^31 - 1), and a search with L >= the
// rows it holds is exact anyway. So the result is always in {0} u [k, kMaxBins].
// Requires k >= 1, 0 < recall_target <= 1 (InvalidArgument otherwise).
inline constexpr int64_t kMaxBins = int64_t{1} << 31;
int64_t bins_for_recall(int64_t k, double recall_target);

// ---------------------------------------------------------------------------
// Placement: where row p of the stream lands. Slots are cut into blocks of
// kPlacementBlock (the last one may be shorter); rows fill the blocks in
// order, and inside block b they land in the order of a fixed pseudo-random
// permutation of that block (Fisher-Yates driven by splitmix64 seeded with b).
// Bins are strided over physical slots (bin = slot mod L), so the rows of any
// bin are a pseudo-random sample of the stream whatever its order -- recall
// follows the formula on data with local or periodic structure -- while a
// memory that is not full only scans the blocks it has written.
class Placement {
 public:
  static constexpr int64_t kPlacementBlock = 65536;

  explicit Placement(int64_t capacity);
  // The placement of a capacity, built once and shared (the tables are
  // immutable and depend on nothing else).
  static std::shared_ptr<const Placement> shared(int64_t capacity);
  int64_t capacity() const { return static_cast<int64_t>(slot_of_.size()); }
  // Slot that stream offset r (= p mod capacity) is written to.
  const int32_t* slot_of() const { return slot_of_.data(); }
  // Inverse: stream offset held by slot s.
  const int32_t* offset_of() const { return offset_of_.data(); }

 private:
  std::vector<int32_t> slot_of_;
  std::vector<int32_t> offset_of_;
};

// ---------------------------------------------------------------------------
// Borrowed views of a grid of memories (see the ring layout above).
enum class KeyLayout : int { kRows = 0, kPanels = 1 };

// Element type of stored keys. bfloat16, float16 and int8 keys are kept in
// panels only, ceil(dim / 2) or ceil(dim / 4) 32-bit words per slot:
// bfloat16 pairs (word i of a slot holds dims 2i, low half, and 2i+1), int8
// quads (dims 4i .. 4i+3, lowest byte first), and float16 halves laid out like
// float32 keys, [dim rounded up to even][16] halves per panel. int8 keys are
// k ~= scale * q with q in [-127, 127] per row; the row's scale and the sum of
// its q are kept per slot (key_scale, key_sum). float16 keys must lie within
// +-65504 (checked at the boundary).
enum class KeyFormat : int { kFloat32 = 0, kBFloat16 = 1, kInt8 = 2, kFloat16 = 3 };

// Parses "float32" | "bfloat16" | "float16" | "int8"; throws InvalidArgument
// naming `dtype`.
KeyFormat parse_key_format(const std::string& name);
// Parses the formats row-layout keys can be scored in (SearchOptions::
// score_format): "float32" | "bfloat16" | "int8"; throws InvalidArgument
// naming `precision`.
KeyFormat parse_score_format(const std::string& name);
const char* key_format_name(KeyFormat format);
// The largest key magnitude a format stores finitely -- 65504 for float16,
// 3.3961773e38 for bfloat16 (above, values round to infinity), one step below
// FLT_MAX for int8 (its scale times 127 must stay finite), FLT_MAX for float32.
// Memory::add's front ends refuse keys beyond it, so whatever add accepts
// survives export and import.
float max_key_magnitude(KeyFormat format);
// The bins a search of keys stored as `format` uses: bins_for_recall, with the
// target raised to 1 - 0.8 (1 - target) for rounded (bfloat16, float16, int8)
// keys, and 16 or more bins rounded up to a multiple of kBinGroup (k=32 at
// 0.9: 145 -> 160 bins, expected recall 0.909).
inline constexpr int64_t kBinGroup = 16;
int64_t bins_for_search(int64_t k, double recall_target, KeyFormat format);

// 32-bit words a slot's key takes: dim, ceil(dim / 2) or ceil(dim / 4).
inline int64_t key_words(KeyFormat format, int64_t dim) {
  switch (format) {
    case KeyFormat::kInt8:
      return (dim + 3) / 4;
    case KeyFormat::kBFloat16:
    case KeyFormat::kFloat16:
      return (dim + 1) / 2;
    default:
      return dim;
  }
}

inline constexpr int64_t kPanelSlots = 16;
inline int64_t padded_capacity(int64_t capacity) {
  return (capacity + kPanelSlots - 1) / kPanelSlots * kPanelSlots;
}

struct MemoryView {
  const void* keys = nullptr;  // float32 rows, or panels of key_format
  const float* values = nullptr;
  const float* key_aux = nullptr;    // may be null: computed on the fly
  const float* key_scale = nullptr;  // int8 only, [G][16 * panels]
  const int32_t* key_sum = nullptr;  // int8 only, [G][16 * panels]
  const int64_t* written = nullptr;
  int64_t grid = 0;
  int64_t capacity = 0;
  int64_t key_dim = 0;
  int64_t key_stride = 0;  // kRows only
  int64_t value_dim = 0;
  int64_t value_stride = 0;
  KeyLayout key_layout = KeyLayout::kRows;
  KeyFormat key_format = KeyFormat::kFloat32;  // kPanels only
  Metric aux_metric = Metric::kInnerProduct;   // what key_aux holds
  const Placement* placement = nullptr;
  // A sub-grid: when set, memory g of the view (g < grid) is memory cells[g]
  // of the storage, whose per-memory arrays (keys, values, key_aux, key_scale,
  // key_sum, written) are indexed by that cell; queries, new rows and results
  // stay indexed by g. The caller checks the cells against its storage
  // (check_cells). Null: memory g is cell g.
  const int64_t* cells = nullptr;

  int64_t cell(int64_t g) const { return cells ? cells[g] : g; }
};

struct MutableMemoryView {
  void* keys = nullptr;
  float* values = nullptr;
  float* key_aux = nullptr;    // may be null: not maintained
  float* key_scale = nullptr;  // int8 only
  int32_t* key_sum = nullptr;  // int8 only
  int64_t* written = nullptr;
  int64_t grid = 0;
  int64_t capacity = 0;
  int64_t key_dim = 0;
  int64_t key_stride = 0;
  int64_t value_dim = 0;
  int64_t value_stride = 0;
  KeyLayout key_layout = KeyLayout::kRows;
  KeyFormat key_format = KeyFormat::kFloat32;  // kPanels only
  Metric aux_metric = Metric::kInnerProduct;
  const Placement* placement = nullptr;
  const int64_t* cells = nullptr;  // as MemoryView::cells

  int64_t cell(int64_t g) const { return cells ? cells[g] : g; }
  MemoryView as_const() const {
    return MemoryView{keys,       values,     key_aux,    key_scale,  key_sum,   written,
                      grid,       capacity,   key_dim,    key_stride, value_dim, value_stride,
                      key_layout, key_format, aux_metric, placement,  cells};
  }
};

// Checks a sub-grid selection of `count` memories of a grid of `grid`: every
// index in [0, grid), and, with `distinct` (what add needs: one writer per
// memory), none twice. Throws InvalidArgument naming `which`.
void check_cells(const int64_t* cells, int64_t count, int64_t grid, bool distinct);

struct SearchOptions {
  int64_t k = 32;
  double recall_target = 0.9;
  Metric metric = Metric::kInnerProduct;
  // Row-layout keys (float32) are scored in this format: each search packs
  // them into bfloat16 or int8 panels as Memory::add would store them, so
  // results equal those of a memory with that key format (returned keys stay
  // the float32 rows). Panel-layout memories score in their own format.
  KeyFormat score_format = KeyFormat::kFloat32;
};

// Element type of the key and value rows a search writes.
enum class RowFormat : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Parses "float32" | "bfloat16" | "float16"; throws InvalidArgument naming `what`.
RowFormat parse_row_format(const std::string& name, const char* what);
const char* row_format_name(RowFormat format);

// Outputs of a search over Q queries per memory. Every field is optional: a
// null pointer is not written (and keys or values not asked for are never
// read from the memory). Result r = (g * Q + q) * k + j. Shapes:
//   scores [G][Q][k] float, indices [G][Q][k] int64 (stream positions, -1 = none),
//   mask [G][Q][k] bool,
//   keys: row r (key_dim elements of key_format) starts at element
//         r * key_row_stride of `keys` (0: key_dim, dense rows); values alike.
// Strides let the caller choose the layout, e.g. keys and values interleaved
// in one [.., k, 2, d] buffer: keys = buf, values = buf + d, both strides 2d.
// bfloat16 and float16 rows are rounded to nearest even from the float32 row.
// Entries are best first; empty entries hold -inf / -1 / false / zeros.
struct SearchOutput {
  float* scores = nullptr;
  int64_t* indices = nullptr;
  bool* mask = nullptr;
  void* keys = nullptr;
  void* values = nullptr;
  int64_t key_row_stride = 0;
  int64_t value_row_stride = 0;
  RowFormat key_format = RowFormat::kFloat32;
  RowFormat value_format = RowFormat::kFloat32;
};

// Queries are [G][Q][key_dim], contiguous. Runs on the shared thread pool.
// Requires 1 <= k <= capacity and 0 < recall_target <= 1 (InvalidArgument).
void search(const MemoryView& memory, const float* queries, int64_t num_queries,
            const SearchOptions& options, const SearchOutput& out);

// Appends T rows to every memory of the grid: new_keys [G][T][key_dim],
// new_values [G][T][value_dim], contiguous. Only the last `capacity` rows of a
// longer segment are stored, but `written` advances by T. Inputs are trusted
// (front ends check shapes and finiteness first), so this cannot fail halfway.
void add(const MutableMemoryView& memory, const float* new_keys, const float* new_values,
         int64_t num_rows);

// Copies n floats from src to dst on the thread pool and returns the index of
// the first one that is NaN, infinite or of magnitude above `limit`, or -1.
// The check reads dst, after the copy: what passes is what was copied, even if
// another thread writes src meanwhile. Front ends stage caller inputs with it
// before add(), so that what is stored is what was checked.
int64_t copy_checked(const float* src, float* dst, int64_t n, float limit);

// Stream position held by `slot` of a memory that has `written` rows, or -1
// if the slot holds no live row.
int64_t position_of_slot(const Placement& placement, int64_t written, int64_t slot);

// ---------------------------------------------------------------------------
// Thread pool shared by all searches and adds (created on first use with
// std::thread::hardware_concurrency() workers, or KNNMEM_NUM_THREADS).
void set_num_threads(int num_threads);
int get_num_threads();

// CPU kernel variant: "avx512_vnni_bf16", "avx512", "avx_vnni", "avx2", "neon_dotprod",
// "neon" or "portable" (supported_kernels() lists this CPU's). The best one the CPU
// supports is used unless KNNMEM_KERNEL names another; set_kernel("") goes
// back to the automatic choice. Throws InvalidArgument for unknown or
// unsupported names.
void set_kernel(const std::string& name);
std::string get_kernel();
std::vector<std::string> supported_kernels();

// ---------------------------------------------------------------------------
// A grid of memories with owned, 64-byte aligned storage.
//
// Thread safety: any number of `search` calls may run at once; `add` and
// `clear` take the memory exclusively, so each call sees the memory entirely
// before or entirely after any other call. Nothing is returned by reference
// that a later call could change.
class Memory {
 public:
  // Throws InvalidArgument for non-positive sizes, std::length_error when the
  // byte size overflows, std::bad_alloc when it cannot be allocated.
  Memory(int64_t grid, int64_t capacity, int64_t key_dim, int64_t value_dim,
         Metric metric = Metric::kInnerProduct, KeyFormat key_format = KeyFormat::kFloat32);
  ~Memory();
  Memory(const Memory&) = delete;
  Memory& operator=(const Memory&) = delete;

  int64_t grid() const { return grid_; }
  int64_t capacity() const { return capacity_; }
  int64_t key_dim() const { return key_dim_; }
  int64_t value_dim() const { return value_dim_; }
  Metric metric() const { return metric_; }
  KeyFormat key_format() const { return key_format_; }
  // Bytes of storage held (keys, values, norms, counters, placement tables).
  int64_t nbytes() const;
  const Placement& placement() const { return *placement_; }

  // See the free functions. Inputs are trusted here, as there. `cells`
  // (num_cells memories; null: the whole grid) selects a sub-grid: inputs and
  // outputs then hold num_cells memories, in that order. The cells are checked
  // (check_cells; distinct for add) under the lock, before anything changes.
  void add(const float* new_keys, const float* new_values, int64_t num_rows,
           const int64_t* cells = nullptr, int64_t num_cells = 0);
  void search(const float* queries, int64_t num_queries, int64_t k, double recall_target,
              const SearchOutput& out, const int64_t* cells = nullptr, int64_t num_cells = 0) const;
  // clear_mask: `grid` flags, or null for all. O(1) per memory.
  void clear(const uint8_t* clear_mask);

  // Per-memory counters, copied out under the lock.
  std::vector<int64_t> written() const;
  std::vector<int64_t> count() const;

  // The stored state in a layout that depends on neither the panels nor the
  // placement (what save/load write; docs/format.md). Row i < count[g] of
  // memory g is stream position written[g] - count[g] + i (oldest first);
  // rows from count[g] on are zero. Keys keep their stored element type:
  // float32, bfloat16 or float16 bits (uint16), or int8 q with key = key_scale * q.
  struct State {
    void* keys = nullptr;        // [grid][capacity][key_dim] float | uint16 | int8
    float* key_scale = nullptr;  // [grid][capacity], int8 keys only (else null)
    float* values = nullptr;     // [grid][capacity][value_dim]
    int64_t* written = nullptr;  // [grid]
  };
  // Copies the state into `out` (every buffer required, sized as above) under
  // the shared lock: one consistent snapshot, concurrent with searches.
  void export_state(const State& out) const;
  // Replaces the whole state with `in` (read only; same layout) under the
  // exclusive lock. Every value is checked first -- written >= 0, keys and
  // values finite (bfloat16 and float16 bits too), int8 keys in [-127, 127]
  // with finite scales >= 0 -- and a
  // bad one throws InvalidArgument naming it before anything is changed.
  // Derived terms (norms, int8 sums) are recomputed as add() computes them,
  // so the memory searches bit-identically to the one exported.
  void import_state(const State& in);

 private:
  MutableMemoryView view_unlocked() const;

  int64_t grid_, capacity_, key_dim_, value_dim_;
  Metric metric_;
  KeyFormat key_format_;
  std::shared_ptr<const Placement> placement_;
  void* keys_ = nullptr;  // panels of key_format_
  float* values_ = nullptr;
  float* key_aux_ = nullptr;
  float* key_scale_ = nullptr;  // int8 only
  int32_t* key_sum_ = nullptr;  // int8 only
  std::vector<int64_t> written_;
  mutable RWLock mutex_;
};

}  // namespace knnmem
