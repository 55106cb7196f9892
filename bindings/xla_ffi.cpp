// XLA FFI boundary of the knnmem core: the custom calls behind knnmem.jax.
//
// The handler runs the same knnmem::search as the numpy path (knnmem.ops.search)
// directly on XLA's buffers, zero-copy: the caller-owned ring layout
//   keys    [*grid, capacity, key_dim]   f32
//   values  [*grid, capacity, value_dim] f32
//   written [*grid]                      s32 or s64 (rows added since the last clear)
//   queries [*qgrid, Q, key_dim]         f32
//   cells   [n] s32 or s64: a sub-grid (memory i of the search is storage memory
//           cells[i] of the flattened grid; then qgrid = (n,)), or shape (0,): the
//           whole grid (qgrid = grid)
//   ...     any further operands are ignored: the buffers of results aliased to
//           them (input_output_aliases), which are overwritten, never read
// and writes scores [*qgrid, Q, k] f32, indices [*qgrid, Q, k] (dtype of written),
// keys [*qgrid, Q, k, key_dim], values [*qgrid, Q, k, value_dim] (each f32, bf16 or
// f16: rows rounded to nearest even), mask [*qgrid, Q, k] pred. A result of shape (0,)
// is not asked for: it is not computed (keys or values not asked for are never read).
// Attributes: k (i64), recall_target (f64), metric ("ip" | "cosine" | "l2"),
// precision ("float32" | "bfloat16" | "int8": the format keys are scored in).
//
// Every check of the call happens here, before the core runs, and a bad call
// returns ffi::Error (INVALID_ARGUMENT) naming the argument; no exception ever
// crosses the FFI boundary. The state lives in the buffers XLA passes in, never
// in a global, so jit, vmap and shard_map stay sound.
//
// This file is compiled into the knnmem._core module when jaxlib's FFI headers
// are found (see CMakeLists.txt), so XLA and numpy calls share one copy of the
// engine (one thread pool, one kernel choice). The handlers are exported as C
// symbols; knnmem.jax wraps them with jax.ffi.pycapsule and registers them.
#include <cmath>
#include <cstdint>
#include <exception>
#include <limits>
#include <memory>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "knnmem/knnmem.hpp"
#include "xla/ffi/api/ffi.h"
#include "xla_ffi_common.hpp"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace ffi = xla::ffi;

// Declared first so that the exported symbols keep default visibility in a
// module built with -fvisibility=hidden.
extern "C" KNNMEM_FFI_EXPORT XLA_FFI_Error* KnnmemSearch(XLA_FFI_CallFrame* call_frame);
extern "C" KNNMEM_FFI_EXPORT int64_t KnnmemFfiAbiVersion();

namespace {

using namespace knnmem::ffi_common;  // NOLINT: Dims, dims_str, invalid, ...

// Asks for transparent huge pages on a large result buffer before it is first written,
// as numpy does for its arrays: XLA's fresh result buffers (the gathered keys and values
// are Q * k rows per memory) otherwise fault in 4 KiB at a time, which cost a quarter of
// a search's time on workload M2. A hint only; failures are ignored.
void advise_huge_pages(void* data, std::size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr std::uintptr_t kHuge = std::uintptr_t{2} << 20;
  if (bytes < 2 * kHuge) return;
  const std::uintptr_t start = reinterpret_cast<std::uintptr_t>(data);
  const std::uintptr_t begin = (start + kHuge - 1) & ~(kHuge - 1);
  const std::uintptr_t end = (start + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

ffi::Error check_dtype(ffi::DataType got, ffi::DataType want, const char* name) {
  if (got == want) return ffi::Error::Success();
  return invalid(std::string(name) + ": expected dtype " + dtype_name(want) + ", got " +
                 dtype_name(got));
}

// `b` must have shape (*grid, tail...); entries of `tail` < 0 match any size.
ffi::Error check_shape(Dims b, Dims grid, std::initializer_list<int64_t> tail, const char* name,
                       const std::string& what) {
  if (has_shape(b, grid, tail)) return ffi::Error::Success();
  return invalid(std::string(name) + ": expected shape " + what + ", got " + dims_str(b));
}

std::string spell(Dims grid, std::initializer_list<std::string> tail) {
  std::ostringstream s;
  s << "(";
  bool first = true;
  for (std::size_t i = 0; i < grid.size(); ++i, first = false) s << (first ? "" : ", ") << grid[i];
  for (const auto& t : tail) {
    s << (first ? "" : ", ") << t;
    first = false;
  }
  s << ")";
  return s.str();
}

std::string named(const char* name, int64_t v) {
  return std::string(name) + "=" + std::to_string(v);
}

// The row format of a keys / values result, from its element type.
ffi::Error row_format_of(ffi::DataType t, const char* name, knnmem::RowFormat* format) {
  switch (t) {
    case ffi::DataType::F32:
      *format = knnmem::RowFormat::kFloat32;
      return ffi::Error::Success();
    case ffi::DataType::BF16:
      *format = knnmem::RowFormat::kBFloat16;
      return ffi::Error::Success();
    case ffi::DataType::F16:
      *format = knnmem::RowFormat::kFloat16;
      return ffi::Error::Success();
    default:
      return invalid(std::string(name) + ": expected dtype float32, bfloat16 or float16, got " +
                     dtype_name(t));
  }
}

// A result of shape (0,) is one the caller did not ask for.
bool not_asked(Dims d) { return d.size() == 1 && d[0] == 0; }

ffi::Error SearchImpl(ffi::AnyBuffer keys, ffi::AnyBuffer values, ffi::AnyBuffer written,
                      ffi::AnyBuffer queries, ffi::AnyBuffer cells, ffi::RemainingArgs /*aliased*/,
                      ffi::Result<ffi::AnyBuffer> out_scores,
                      ffi::Result<ffi::AnyBuffer> out_indices, ffi::Result<ffi::AnyBuffer> out_keys,
                      ffi::Result<ffi::AnyBuffer> out_values, ffi::Result<ffi::AnyBuffer> out_mask,
                      int64_t k, double recall_target, std::string_view metric_name,
                      std::string_view precision) {
  try {
    // dtypes
    if (auto e = check_dtype(keys.element_type(), ffi::DataType::F32, "keys"); !e.success())
      return e;
    if (auto e = check_dtype(values.element_type(), ffi::DataType::F32, "values"); !e.success())
      return e;
    if (auto e = check_dtype(queries.element_type(), ffi::DataType::F32, "queries"); !e.success())
      return e;
    const ffi::DataType index_type = written.element_type();
    if (index_type != ffi::DataType::S32 && index_type != ffi::DataType::S64) {
      return invalid(std::string("written: expected dtype int32 or int64, got ") +
                     dtype_name(index_type));
    }
    const ffi::DataType cell_type = cells.element_type();
    if (cell_type != ffi::DataType::S32 && cell_type != ffi::DataType::S64) {
      return invalid(std::string("which: expected dtype int32 or int64, got ") +
                     dtype_name(cell_type));
    }

    // shapes: the grid is every dimension of keys but the last two
    const Dims kd = keys.dimensions();
    if (kd.size() < 2) {
      return invalid("keys: expected shape (*grid, capacity, key_dim), got " + dims_str(kd));
    }
    const Dims grid = kd.first(kd.size() - 2);
    const int64_t capacity = kd[kd.size() - 2];
    const int64_t key_dim = kd[kd.size() - 1];
    if (capacity < 1 || key_dim < 1 || capacity > std::numeric_limits<int32_t>::max()) {
      return invalid("keys: expected capacity in [1, 2**31-1] and key_dim >= 1, got shape " +
                     dims_str(kd));
    }
    const Dims vd = values.dimensions();
    if (auto e = check_shape(vd, grid, {capacity, -1}, "values",
                             spell(grid, {named("capacity", capacity), "value_dim"}));
        !e.success())
      return e;
    const int64_t value_dim = vd[vd.size() - 1];
    if (value_dim < 1) return invalid("values: expected value_dim >= 1, got " + dims_str(vd));
    if (auto e = check_shape(written.dimensions(), grid, {}, "written", spell(grid, {}));
        !e.success())
      return e;
    // The memories searched: the grid, or the sub-grid `cells` selects.
    const Dims cd = cells.dimensions();
    if (cd.size() != 1) return invalid("which: expected shape (n,), got " + dims_str(cd));
    const bool sub_grid = cd[0] > 0;
    const Dims qgrid = sub_grid ? cd : grid;
    const Dims qd = queries.dimensions();
    if (auto e = check_shape(qd, qgrid, {-1, key_dim}, "queries",
                             spell(qgrid, {"Q", named("key_dim", key_dim)}));
        !e.success())
      return e;
    const int64_t nq = qd[qd.size() - 2];

    // attributes
    knnmem::Metric metric;
    try {
      knnmem::check_search_options(k, recall_target, capacity);
      metric = knnmem::parse_metric(std::string(metric_name));
    } catch (const knnmem::InvalidArgument& e) {
      return invalid(e.what());
    }
    knnmem::SearchOptions options{k, recall_target, metric};
    options.score_format = knnmem::parse_score_format(std::string(precision));  // throws

    // results: shapes are fixed by the caller's abstract evaluation; checked all the same.
    // Each is either its full shape or (0,), not asked for.
    knnmem::RowFormat key_format = knnmem::RowFormat::kFloat32;
    knnmem::RowFormat value_format = knnmem::RowFormat::kFloat32;
    if (auto e = row_format_of(out_keys->element_type(), "result keys", &key_format); !e.success())
      return e;
    if (auto e = row_format_of(out_values->element_type(), "result values", &value_format);
        !e.success())
      return e;
    struct Expected {
      ffi::Result<ffi::AnyBuffer>* buf;
      const char* name;
      ffi::DataType dtype;
      int64_t last;  // < 0: no trailing dimension after k
      bool asked;
    };
    Expected expected[] = {
        {&out_scores, "scores", ffi::DataType::F32, -1, true},
        {&out_indices, "indices", index_type, -1, true},
        {&out_keys, "result keys", out_keys->element_type(), key_dim, true},
        {&out_values, "result values", out_values->element_type(), value_dim, true},
        {&out_mask, "mask", ffi::DataType::PRED, -1, true},
    };
    for (Expected& r : expected) {
      if (auto e = check_dtype((*r.buf)->element_type(), r.dtype, r.name); !e.success()) return e;
      const Dims rd = (*r.buf)->dimensions();
      r.asked = !not_asked(rd);
      if (!r.asked) continue;
      ffi::Error e = r.last < 0 ? check_shape(rd, qgrid, {nq, k}, r.name,
                                              spell(qgrid, {named("Q", nq), named("k", k)}))
                                : check_shape(rd, qgrid, {nq, k, r.last}, r.name,
                                              spell(qgrid, {named("Q", nq), named("k", k), "dim"}));
      if (!e.success()) return e;
    }

    int64_t G = 1;  // memories of the storage
    for (int64_t g : grid) G *= g;
    int64_t n = 1;  // memories searched
    for (int64_t g : qgrid) n *= g;

    // Scratch reused by this thread's later calls (no state: it never outlives a call's
    // meaning), so that int32 counters and indices cost no fresh pages per call.
    thread_local std::vector<int64_t> written64, indices64, cells64;

    // cells: in [0, G)
    if (sub_grid) {
      cells64.resize(static_cast<std::size_t>(n));
      for (int64_t i = 0; i < n; ++i) {
        cells64[i] = cell_type == ffi::DataType::S64 ? cells.typed_data<int64_t>()[i]
                                                     : cells.typed_data<int32_t>()[i];
      }
      knnmem::check_cells(cells64.data(), n, G, false);  // throws, naming which
    }
    if (n == 0 || nq == 0) return ffi::Error::Success();

    // written: counts >= 0, widened to int64 for the core
    written64.resize(static_cast<std::size_t>(G));
    for (int64_t g = 0; g < G; ++g) {
      written64[g] = index_type == ffi::DataType::S64 ? written.typed_data<int64_t>()[g]
                                                      : written.typed_data<int32_t>()[g];
      if (written64[g] < 0) {
        return invalid("written: expected counts >= 0, got " + std::to_string(written64[g]) +
                       " at flat index " + std::to_string(g));
      }
    }

    // queries: finite
    const float* q = queries.typed_data<float>();
    const int64_t q_count = n * nq * key_dim;
    for (int64_t i = 0; i < q_count; ++i) {
      if (!std::isfinite(q[i])) {
        std::ostringstream s;
        const int64_t row = i / key_dim;
        s << "queries: expected finite values, got " << q[i] << " at grid cell " << row / nq
          << ", query " << row % nq << ", component " << i % key_dim;
        return invalid(s.str());
      }
    }

    std::shared_ptr<const knnmem::Placement> placement = knnmem::Placement::shared(capacity);
    knnmem::MemoryView view;
    view.keys = keys.typed_data<float>();
    view.values = values.typed_data<float>();
    view.key_aux = nullptr;
    view.written = written64.data();
    view.grid = n;
    view.capacity = capacity;
    view.key_dim = key_dim;
    view.key_stride = key_dim;
    view.value_dim = value_dim;
    view.value_stride = value_dim;
    view.key_layout = knnmem::KeyLayout::kRows;
    view.placement = placement.get();
    view.cells = sub_grid ? cells64.data() : nullptr;

    const bool want_indices = expected[1].asked;
    // int32 indices: the core writes int64, narrowed after (positions < written).
    int64_t* indices = nullptr;
    if (want_indices && index_type == ffi::DataType::S64) {
      indices = out_indices->typed_data<int64_t>();
    } else if (want_indices) {
      indices64.resize(static_cast<std::size_t>(n * nq * k));
      indices = indices64.data();
    }
    for (const Expected& r : expected) {
      if (r.asked) advise_huge_pages((*r.buf)->untyped_data(), (*r.buf)->size_bytes());
    }
    knnmem::SearchOutput out;
    out.scores = expected[0].asked ? out_scores->typed_data<float>() : nullptr;
    out.indices = indices;
    out.mask = expected[4].asked ? out_mask->typed_data<bool>() : nullptr;
    out.keys = expected[2].asked ? out_keys->untyped_data() : nullptr;
    out.values = expected[3].asked ? out_values->untyped_data() : nullptr;
    out.key_format = key_format;
    out.value_format = value_format;
    knnmem::search(view, q, nq, options, out);
    if (want_indices && index_type == ffi::DataType::S32) {
      int32_t* dst = out_indices->typed_data<int32_t>();
      for (std::size_t i = 0; i < indices64.size(); ++i)
        dst[i] = static_cast<int32_t>(indices64[i]);
    }
    return ffi::Error::Success();
  } catch (const knnmem::InvalidArgument& e) {
    return ffi::Error::InvalidArgument(e.what());
  } catch (const std::bad_alloc&) {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted, "knnmem search: out of memory");
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("knnmem search: ") + e.what());
  } catch (...) {
    return ffi::Error::Internal("knnmem search: unknown error");
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KnnmemSearch, SearchImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // keys
                                  .Arg<ffi::AnyBuffer>()  // values
                                  .Arg<ffi::AnyBuffer>()  // written
                                  .Arg<ffi::AnyBuffer>()  // queries
                                  .Arg<ffi::AnyBuffer>()  // cells
                                  .RemainingArgs()        // buffers aliased to results
                                  .Ret<ffi::AnyBuffer>()  // scores
                                  .Ret<ffi::AnyBuffer>()  // indices
                                  .Ret<ffi::AnyBuffer>()  // keys
                                  .Ret<ffi::AnyBuffer>()  // values
                                  .Ret<ffi::AnyBuffer>()  // mask
                                  .Attr<int64_t>("k")
                                  .Attr<double>("recall_target")
                                  .Attr<std::string_view>("metric")
                                  .Attr<std::string_view>("precision"));

// Bumped when the handler's operands, results or attributes change, so that
// knnmem.jax can refuse a stale build instead of calling it wrongly.
int64_t KnnmemFfiAbiVersion() { return 3; }
