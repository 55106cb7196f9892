// XLA FFI boundary of the knnmem core: the custom calls behind knnmem.jax.
//
// The handler runs the same knnmem::search as the numpy path (knnmem.ops.search)
// directly on XLA's buffers, zero-copy: the caller-owned ring layout
//   keys    [*grid, capacity, key_dim]   f32
//   values  [*grid, capacity, value_dim] f32
//   written [*grid]                      s32 or s64 (rows added since the last clear)
//   queries [*grid, Q, key_dim]          f32
// and writes scores [*grid, Q, k] f32, indices [*grid, Q, k] (dtype of written),
// keys [*grid, Q, k, key_dim], values [*grid, Q, k, value_dim], mask [*grid, Q, k]
// pred. Attributes: k (i64), recall_target (f64), metric ("ip" | "cosine" | "l2"),
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

ffi::Error SearchImpl(ffi::AnyBuffer keys, ffi::AnyBuffer values, ffi::AnyBuffer written,
                      ffi::AnyBuffer queries, ffi::Result<ffi::AnyBuffer> out_scores,
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
    const Dims qd = queries.dimensions();
    if (auto e = check_shape(qd, grid, {-1, key_dim}, "queries",
                             spell(grid, {"Q", named("key_dim", key_dim)}));
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

    // results: shapes are fixed by the caller's abstract evaluation; checked all the same
    struct Expected {
      ffi::Result<ffi::AnyBuffer>* buf;
      const char* name;
      ffi::DataType dtype;
      int64_t last;  // < 0: no trailing dimension after k
    };
    const Expected expected[] = {
        {&out_scores, "scores", ffi::DataType::F32, -1},
        {&out_indices, "indices", index_type, -1},
        {&out_keys, "result keys", ffi::DataType::F32, key_dim},
        {&out_values, "result values", ffi::DataType::F32, value_dim},
        {&out_mask, "mask", ffi::DataType::PRED, -1},
    };
    for (const Expected& r : expected) {
      if (auto e = check_dtype((*r.buf)->element_type(), r.dtype, r.name); !e.success()) return e;
      const Dims rd = (*r.buf)->dimensions();
      ffi::Error e = r.last < 0 ? check_shape(rd, grid, {nq, k}, r.name,
                                              spell(grid, {named("Q", nq), named("k", k)}))
                                : check_shape(rd, grid, {nq, k, r.last}, r.name,
                                              spell(grid, {named("Q", nq), named("k", k), "dim"}));
      if (!e.success()) return e;
    }

    int64_t G = 1;
    for (int64_t g : grid) G *= g;
    if (G == 0 || nq == 0) return ffi::Error::Success();

    // Scratch reused by this thread's later calls (no state: it never outlives a call's
    // meaning), so that int32 counters and indices cost no fresh pages per call.
    thread_local std::vector<int64_t> written64, indices64;

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
    const int64_t q_count = G * nq * key_dim;
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
    view.grid = G;
    view.capacity = capacity;
    view.key_dim = key_dim;
    view.key_stride = key_dim;
    view.value_dim = value_dim;
    view.value_stride = value_dim;
    view.key_layout = knnmem::KeyLayout::kRows;
    view.placement = placement.get();

    // int32 indices: the core writes int64, narrowed after (positions < written).
    int64_t* indices = nullptr;
    if (index_type == ffi::DataType::S64) {
      indices = out_indices->typed_data<int64_t>();
    } else {
      indices64.resize(static_cast<std::size_t>(G * nq * k));
      indices = indices64.data();
    }
    for (const Expected& r : expected)
      advise_huge_pages((*r.buf)->untyped_data(), (*r.buf)->size_bytes());
    knnmem::SearchOutput out{out_scores->typed_data<float>(), indices, out_mask->typed_data<bool>(),
                             out_keys->typed_data<float>(), out_values->typed_data<float>()};
    knnmem::search(view, q, nq, options, out);
    if (index_type == ffi::DataType::S32) {
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
int64_t KnnmemFfiAbiVersion() { return 2; }
