// pybind11 boundary of the knnmem core (module knnmem._core).
//
// The Python side's checks of user input happen here, before the core runs
// and before anything is changed: shapes, dtypes, layout, finiteness. Messages
// name the public argument, what was expected and what came. (The core checks
// again what it reads from buffers another thread may change: the counters of
// caller-owned rings.) The GIL is released while the core works.
#include <pthread.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <charconv>
#include <climits>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "core/block_cache.hpp"
#include "gil.hpp"
#include "knnmem/knnmem.hpp"

namespace py = pybind11;
using knnmem::InvalidArgument;
using knnmem_bindings::without_gil;

namespace {

using FloatArray = py::array_t<float, py::array::c_style>;

std::string shape_str(const py::array& a) {
  std::ostringstream s;
  s << "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s << (i ? ", " : "") << a.shape(i);
  s << (a.ndim() == 1 ? ",)" : ")");
  return s.str();
}

// `expected` entries < 0 match any size. `what` spells the expected shape.
void check_shape(const py::array& a, const char* name, const std::vector<int64_t>& expected,
                 const std::string& what) {
  bool ok = a.ndim() == static_cast<py::ssize_t>(expected.size());
  for (std::size_t i = 0; ok && i < expected.size(); ++i) {
    ok = expected[i] < 0 || a.shape(static_cast<py::ssize_t>(i)) == expected[i];
  }
  if (!ok) {
    throw InvalidArgument(std::string(name) + ": expected shape " + what + ", got " + shape_str(a));
  }
}

void check_float32(const py::array& a, const char* name) {
  if (!a.dtype().is(py::dtype::of<float>())) {
    throw py::type_error(std::string(name) + ": expected dtype float32, got " +
                         std::string(py::str(a.dtype())));
  }
  if (!(a.flags() & py::array::c_style)) {
    throw InvalidArgument(std::string(name) +
                          ": expected a C-contiguous array, got strides that are not; "
                          "pass numpy.ascontiguousarray(" +
                          name + ")");
  }
}

// Index of the first of n values that is NaN, infinite or of magnitude above
// `limit`, or -1.
int64_t first_bad(const float* data, int64_t n, float limit) {
  for (int64_t i = 0; i < n; ++i) {
    if (!(std::fabs(data[i]) <= limit)) return i;  // also NaN
  }
  return -1;
}

// Throws naming element `bad` of `a` (`what` says what was expected of it).
[[noreturn]] void throw_bad_value(const float* data, int64_t bad, const py::array& a,
                                  const char* name, const char* what) {
  std::vector<int64_t> index(static_cast<std::size_t>(a.ndim()));
  int64_t rest = bad;
  for (py::ssize_t d = a.ndim() - 1; d >= 0; --d) {
    index[static_cast<std::size_t>(d)] = rest % a.shape(d);
    rest /= a.shape(d);
  }
  std::ostringstream s;
  s << name << ": expected " << (what && std::isfinite(data[bad]) ? what : "finite values")
    << ", got " << data[bad] << " at index [";
  for (std::size_t d = 0; d < index.size(); ++d) s << (d ? ", " : "") << index[d];
  s << "]";
  throw InvalidArgument(s.str());
}

// Throws naming the first NaN/Inf element. Scans without the GIL.
void check_finite(const float* data, const py::array& a, const char* name) {
  const int64_t n = static_cast<int64_t>(a.size());
  const float limit = std::numeric_limits<float>::max();
  const int64_t bad = without_gil([&] { return first_bad(data, n, limit); });
  if (bad >= 0) throw_bad_value(data, bad, a, name, nullptr);
}

// Private copies of add()'s float32 inputs, made on the core's threads without
// the GIL and checked as they are made (finite, and within `limit` where the
// key format needs it): another thread writing the caller's arrays meanwhile
// cannot get unchecked values stored, since the core reads only the copies.
// The buffer is kept for the calling thread's next add while it is at most
// kKeepBytes (a steady loop then pays no page faults for it).
class Staging {
 public:
  static constexpr std::size_t kKeepBytes = std::size_t{64} << 20;

  Staging(std::size_t keys, std::size_t values) : keys_(keys) {
    std::vector<float>& buf = buffer();
    if (buf.size() < keys + values) buf.resize(keys + values);
    data_ = buf.data();
  }
  ~Staging() {
    std::vector<float>& buf = buffer();
    if (buf.size() * sizeof(float) > kKeepBytes) std::vector<float>().swap(buf);
  }
  Staging(const Staging&) = delete;
  Staging& operator=(const Staging&) = delete;

  // Copies and checks input `a` (`data`) into part 0 (keys) or 1 (values).
  const float* stage(int part, const float* data, const py::array& a, const char* name,
                     float limit = std::numeric_limits<float>::max(), const char* what = nullptr) {
    float* dst = part == 0 ? data_ : data_ + keys_;
    const auto n = static_cast<int64_t>(a.size());
    const int64_t bad = without_gil([&] { return knnmem::copy_checked(data, dst, n, limit); });
    if (bad >= 0) throw_bad_value(dst, bad, a, name, what);
    return dst;
  }

 private:
  static std::vector<float>& buffer() {
    thread_local std::vector<float> buf;
    return buf;
  }
  std::size_t keys_;
  float* data_ = nullptr;
};

// A [*grid, rows, cols] input: the leading dimensions hold the grid's cells
// (the caller's grid shape), so messages can use the caller's coordinates.
int64_t rows_of(const py::array& a) { return a.ndim() >= 3 ? a.shape(a.ndim() - 2) : -1; }

// Checks dtype, layout and shape of a [*grid, rows, cols] input (rows < 0: any).
const float* checked_shape(const py::array& a, const char* name, int64_t grid, int64_t rows,
                           int64_t cols, const std::string& what) {
  check_float32(a, name);
  int64_t cells = 1;
  for (py::ssize_t d = 0; d + 2 < a.ndim(); ++d) cells *= a.shape(d);
  if (a.ndim() < 3 || cells != grid || (rows >= 0 && rows_of(a) != rows) ||
      a.shape(a.ndim() - 1) != cols) {
    throw InvalidArgument(std::string(name) + ": expected shape " + what + ", got " + shape_str(a));
  }
  return static_cast<const float*>(a.data());
}

// checked_shape, then every value finite (checked in place: for queries, which
// the core only reads; a value changed meanwhile changes scores, never addresses).
const float* checked_input(const py::array& a, const char* name, int64_t grid, int64_t rows,
                           int64_t cols, const std::string& what) {
  const float* data = checked_shape(a, name, grid, rows, cols, what);
  check_finite(data, a, name);
  return data;
}

// Appending T rows must leave every position counter within int64 (of the
// selected memories: `cells`, or all when null).
void check_room(const int64_t* written, int64_t grid, int64_t rows, const char* name,
                const int64_t* cells = nullptr) {
  for (int64_t i = 0; i < grid; ++i) {
    const int64_t g = cells ? cells[i] : i;
    if (written[g] > INT64_MAX - rows) {
      throw InvalidArgument(std::string(name) + ": adding " + std::to_string(rows) +
                            " rows after " + std::to_string(written[g]) +
                            " overflows the 64-bit position counter of memory " +
                            std::to_string(g));
    }
  }
}

std::string dims(std::initializer_list<std::string> parts) {
  std::string s = "(";
  bool first = true;
  for (const auto& p : parts) {
    s += (first ? "" : ", ") + p;
    first = false;
  }
  return s + ")";
}
std::string named(const char* name, int64_t v) {
  return std::string(name) + "=" + std::to_string(v);
}

// The fields of a search result, in SearchResult order.
constexpr const char* kFields[5] = {"scores", "indices", "keys", "values", "mask"};

// What a search is asked to write: `fields` (names of kFields; None: every
// field, or, when `out` is given, those of its arrays that are not None),
// into the caller's arrays of `out` where given, else into new ones. Key and
// value rows are written in the format of the caller's array, or, for new
// arrays and arrays of 16-bit integers (raw bits), in `key_dtype` / `value_dtype`.
struct Request {
  std::optional<py::tuple> out;
  std::array<bool, 5> want{};
  knnmem::RowFormat key_format = knnmem::RowFormat::kFloat32;
  knnmem::RowFormat value_format = knnmem::RowFormat::kFloat32;
};

Request parse_request(const std::optional<py::tuple>& out, const py::object& fields,
                      const std::string& key_dtype, const std::string& value_dtype) {
  Request r;
  r.key_format = knnmem::parse_row_format(key_dtype, "key_dtype");
  r.value_format = knnmem::parse_row_format(value_dtype, "value_dtype");
  if (out) {
    if (out->size() != 5) {
      throw InvalidArgument("out: expected (scores, indices, keys, values, mask), got " +
                            std::to_string(out->size()) + " items");
    }
    r.out = out;
  }
  if (fields.is_none()) {
    for (std::size_t i = 0; i < 5; ++i) r.want[i] = !out || !(*out)[i].is_none();
    return r;
  }
  if (py::isinstance<py::str>(fields)) {
    throw py::type_error(
        "fields: expected a sequence of names such as ('scores', 'values'), got '" +
        fields.cast<std::string>() + "'");
  }
  for (const py::handle f : fields) {
    if (!py::isinstance<py::str>(f)) {
      throw py::type_error("fields: expected names (str), got " +
                           std::string(py::str(py::type::of(f).attr("__name__"))));
    }
    const std::string name = f.cast<std::string>();
    std::size_t i = 0;
    while (i < 5 && name != kFields[i]) ++i;
    if (i == 5) {
      throw InvalidArgument(
          "fields: expected names among 'scores', 'indices', 'keys', 'values', "
          "'mask', got '" +
          name + "'");
    }
    r.want[i] = true;
  }
  return r;
}

// The row format of a caller's key or value array: float32, float16, bfloat16
// (ml_dtypes' type), or 16-bit integers holding the bits of `fallback`
// (bfloat16 or float16, as row_dtype says).
knnmem::RowFormat row_format_of(const py::array& a, const std::string& name,
                                knnmem::RowFormat fallback) {
  const std::string dt = py::str(a.dtype());
  if (dt == "float32") return knnmem::RowFormat::kFloat32;
  if (dt == "float16") return knnmem::RowFormat::kFloat16;
  if (dt == "bfloat16") return knnmem::RowFormat::kBFloat16;
  if ((dt == "uint16" || dt == "int16") && fallback != knnmem::RowFormat::kFloat32) return fallback;
  throw py::type_error("out: " + name +
                       " must have dtype float32, float16 or bfloat16 (or 16-bit integers holding "
                       "bfloat16 or float16 bits, with that row dtype), got " +
                       dt);
}

// Checks a caller's array for `rows` rows of `dim` elements: writeable, its
// last axis contiguous and every other axis folding into one row stride (so
// views such as buf[..., 0, :] of an interleaved buffer qualify). Returns the
// row stride in elements.
int64_t row_stride_of(const py::array& a, const std::string& name, int64_t rows, int64_t dim) {
  const py::ssize_t nd = a.ndim();
  const auto item = static_cast<py::ssize_t>(a.itemsize());
  if (!a.writeable()) throw InvalidArgument("out: " + name + " must be writeable");
  int64_t count = 1;
  for (py::ssize_t d = 0; d + 1 < nd; ++d) count *= a.shape(d);
  if (nd < 2 || a.shape(nd - 1) != dim || count != rows) {
    throw InvalidArgument("out: " + name + " must hold " + std::to_string(rows) + " rows of " +
                          std::to_string(dim) + " (the result's shape), got shape " + shape_str(a));
  }
  if (dim > 1 && a.strides(nd - 1) != item) {
    throw InvalidArgument("out: " + name + " must have a contiguous last axis");
  }
  // Rows in C order must be equally spaced: each axis's stride is the next
  // one's times its size (axes of size 1 have no stride to check).
  py::ssize_t stride = 0;  // bytes between consecutive rows, once known
  py::ssize_t span = 0;    // bytes the axes after the current one cover
  bool ok = true;
  for (py::ssize_t d = nd - 2; d >= 0 && ok; --d) {
    if (a.shape(d) == 1) continue;
    if (stride == 0) {
      stride = a.strides(d);
      ok = stride > 0 && stride % item == 0 && stride / item >= dim;
    } else {
      ok = a.strides(d) == span;
    }
    span = a.strides(d) * a.shape(d);
  }
  if (!ok) {
    std::vector<py::ssize_t> strides(a.strides(), a.strides() + nd);
    throw InvalidArgument("out: " + name +
                          " must be a view whose rows are equally spaced and do not overlap "
                          "(its last axis contiguous), got strides " +
                          std::string(py::str(py::cast(strides))));
  }
  return stride > 0 ? stride / item : dim;
}

// Memory of big result arrays. A loop of searches allocates the same result
// arrays every step; fresh memory of that size comes from the kernel, and the
// first write to each of its pages faults (on M2, 134 MB of key and value rows:
// a large share of the search). Arrays of at least kMinBytes therefore take
// their memory from, and give it back to, a cache of recently freed blocks of at
// most kKeepBytes in all; an array that is still referenced keeps its block, so
// nothing a caller holds is reused.
class ResultCache {
 public:
  static constexpr std::size_t kMinBytes = std::size_t{1} << 20;
  static constexpr std::size_t kKeepBytes = std::size_t{256} << 20;

  // An array of `dtype` and `shape` (C order), its memory from the cache when big.
  static py::array array(const py::dtype& dtype, const std::vector<py::ssize_t>& shape) {
    std::size_t bytes = static_cast<std::size_t>(dtype.itemsize());
    for (py::ssize_t n : shape) bytes *= static_cast<std::size_t>(n);
    if (bytes < kMinBytes) return py::array(dtype, shape);
    knnmem::detail::BlockCache::Block* block = blocks().take(bytes);
    py::capsule owner(
        block, [](void* b) { blocks().give(static_cast<knnmem::detail::BlockCache::Block*>(b)); });
    return py::array(dtype, shape, block->data, owner);
  }

 private:
  // Never destroyed: freed arrays may outlive exit. Its fork handlers only
  // guard its own mutex, which no call holds while it waits for anything else.
  static knnmem::detail::BlockCache& blocks() {
    static knnmem::detail::BlockCache* const cache = [] {
      auto* c = new knnmem::detail::BlockCache(kKeepBytes, /*huge_pages=*/true);
      pthread_atfork([] { blocks().before_fork(); }, [] { blocks().after_fork(false); },
                     [] { blocks().after_fork(true); });
      return c;
    }();
    return *cache;
  }
};

// Allocates (or takes from the request's `out`) the result arrays and runs
// `run(out)` without the GIL. Returns the five fields; those not asked for are None.
template <class Run>
py::tuple run_search(int64_t grid, int64_t nq, int64_t k, int64_t key_dim, int64_t value_dim,
                     const Request& req, Run&& run) {
  const int64_t rows = grid * nq * k;
  std::array<py::object, 5> result{py::none(), py::none(), py::none(), py::none(), py::none()};
  knnmem::SearchOutput out;
  auto given = [&](std::size_t i) -> std::optional<py::array> {
    if (!req.out || (*req.out)[i].is_none()) return std::nullopt;
    if (!py::isinstance<py::array>((*req.out)[i])) {
      throw py::type_error(std::string("out: ") + kFields[i] + " must be a numpy array, got " +
                           std::string(py::str(py::type::of((*req.out)[i]).attr("__name__"))));
    }
    return py::reinterpret_borrow<py::array>((*req.out)[i]);
  };
  // scores, indices, mask: dense arrays of their dtype.
  auto dense = [&](std::size_t i, py::dtype dtype) -> void* {
    if (!req.want[i]) return nullptr;
    std::optional<py::array> a = given(i);
    if (!a) {
      a = ResultCache::array(dtype, {grid, nq, k});
    } else if (!a->dtype().is(dtype) || !(a->flags() & py::array::c_style) || !a->writeable() ||
               a->size() != rows) {
      throw InvalidArgument(std::string("out: ") + kFields[i] +
                            " must be a writeable C-contiguous array of dtype " +
                            std::string(py::str(dtype)) + " and the result's shape");
    }
    result[i] = *a;
    return a->mutable_data();
  };
  // keys, values: rows of any row format, equally spaced.
  auto rows_of_field = [&](std::size_t i, int64_t dim, int64_t& stride,
                           knnmem::RowFormat& format) -> void* {
    if (!req.want[i]) return nullptr;
    const knnmem::RowFormat asked = i == 2 ? req.key_format : req.value_format;
    std::optional<py::array> a = given(i);
    if (!a) {
      format = asked;
      const py::dtype dt = format == knnmem::RowFormat::kFloat32 ? py::dtype::of<float>()
                           : format == knnmem::RowFormat::kFloat16
                               ? py::dtype("float16")
                               : py::dtype::of<uint16_t>();  // bfloat16 bits
      a = ResultCache::array(dt, {grid, nq, k, dim});
      stride = dim;
    } else {
      format = row_format_of(*a, kFields[i], asked);
      stride = row_stride_of(*a, kFields[i], rows, dim);
    }
    result[i] = *a;
    return a->mutable_data();
  };
  out.scores = static_cast<float*>(dense(0, py::dtype::of<float>()));
  out.indices = static_cast<int64_t*>(dense(1, py::dtype::of<int64_t>()));
  out.keys = rows_of_field(2, key_dim, out.key_row_stride, out.key_format);
  out.values = rows_of_field(3, value_dim, out.value_row_stride, out.value_format);
  out.mask = static_cast<bool*>(dense(4, py::dtype::of<bool>()));
  without_gil([&] { run(out); });
  return py::make_tuple(result[0], result[1], result[2], result[3], result[4]);
}

// A sub-grid selection: an int64 array of memory indices (checked by the core
// against the grid), or None for the whole grid.
struct Cells {
  std::optional<py::array_t<int64_t, py::array::c_style>> array;
  const int64_t* data() const { return array ? array->data() : nullptr; }
  int64_t count(int64_t grid) const { return array ? static_cast<int64_t>(array->size()) : grid; }
};

Cells cells_of(const py::object& which) {
  Cells c;
  if (which.is_none()) return c;
  py::array a = py::array::ensure(which);
  if (!a || !a.dtype().is(py::dtype::of<int64_t>()) || a.ndim() != 1) {
    throw py::type_error("which: expected a 1-d int64 array of memory indices");
  }
  c.array = py::array_t<int64_t, py::array::c_style>::ensure(a);
  return c;
}

// A caller-owned ring: keys [G, C, d], values [G, C, dv], written [G] int64.
struct RingArrays {
  knnmem::MutableMemoryView view;
  std::shared_ptr<const knnmem::Placement> placement;
};

RingArrays ring_view(const py::array& keys, const py::array& values, const py::array& written,
                     bool writeable) {
  check_float32(keys, "keys");
  check_float32(values, "values");
  if (keys.ndim() != 3) {
    throw InvalidArgument("keys: expected shape (grid, capacity, key_dim), got " + shape_str(keys));
  }
  const int64_t grid = keys.shape(0), capacity = keys.shape(1), key_dim = keys.shape(2);
  if (capacity < 1 || key_dim < 1) {
    throw InvalidArgument("keys: expected capacity >= 1 and key_dim >= 1, got shape " +
                          shape_str(keys));
  }
  check_shape(values, "values", {grid, capacity, -1},
              dims({named("grid", grid), named("capacity", capacity), "value_dim"}));
  if (values.shape(2) < 1) {
    throw InvalidArgument("values: expected value_dim >= 1, got shape " + shape_str(values));
  }
  if (!written.dtype().is(py::dtype::of<int64_t>())) {
    throw py::type_error("written: expected dtype int64, got " +
                         std::string(py::str(written.dtype())));
  }
  check_shape(written, "written", {grid}, dims({named("grid", grid)}));
  if (!(written.flags() & py::array::c_style)) {
    throw InvalidArgument("written: expected a C-contiguous array");
  }
  const int64_t* w = static_cast<const int64_t*>(written.data());
  for (int64_t g = 0; g < grid; ++g) {
    if (w[g] < 0) {
      throw InvalidArgument("written: expected counts >= 0, got " + std::to_string(w[g]) +
                            " at index [" + std::to_string(g) + "]");
    }
  }
  if (writeable) {
    for (auto [a, name] : {std::pair{&keys, "keys"}, {&values, "values"}, {&written, "written"}}) {
      if (!a->writeable())
        throw InvalidArgument(std::string(name) + ": expected a writeable array");
    }
  }
  RingArrays r;
  r.placement = knnmem::Placement::shared(capacity);
  knnmem::MutableMemoryView& v = r.view;
  v.keys = static_cast<float*>(const_cast<void*>(keys.data()));
  v.values = static_cast<float*>(const_cast<void*>(values.data()));
  v.written = static_cast<int64_t*>(const_cast<void*>(written.data()));
  v.grid = grid;
  v.capacity = capacity;
  v.key_dim = key_dim;
  v.key_stride = key_dim;
  v.value_dim = values.shape(2);
  v.value_stride = values.shape(2);
  v.key_layout = knnmem::KeyLayout::kRows;
  v.placement = r.placement.get();
  return r;
}

py::array_t<int64_t> to_numpy(const std::vector<int64_t>& v) {
  py::array_t<int64_t> out(static_cast<py::ssize_t>(v.size()));
  std::memcpy(out.mutable_data(), v.data(), v.size() * sizeof(int64_t));
  return out;
}

// --- The module's functions, one per entry, bound by the table below ----------

void translate_errors(std::exception_ptr p) {
  try {
    if (p) std::rethrow_exception(p);
  } catch (const InvalidArgument& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
  } catch (const std::length_error& e) {
    PyErr_SetString(PyExc_MemoryError, e.what());
  } catch (const knnmem::AllocationError& e) {
    PyErr_SetString(PyExc_MemoryError, e.what());
  }
}

knnmem::Memory* memory_new(int64_t grid, int64_t capacity, int64_t key_dim, int64_t value_dim,
                           const std::string& metric, const std::string& dtype) {
  return new knnmem::Memory(grid, capacity, key_dim, value_dim, knnmem::parse_metric(metric),
                            knnmem::parse_key_format(dtype));
}

std::string memory_dtype(const knnmem::Memory& self) {
  return knnmem::key_format_name(self.key_format());
}
std::string memory_metric(const knnmem::Memory& self) { return knnmem::metric_name(self.metric()); }
py::array_t<int64_t> memory_written(const knnmem::Memory& self) { return to_numpy(self.written()); }
py::array_t<int64_t> memory_count(const knnmem::Memory& self) { return to_numpy(self.count()); }

void memory_add(knnmem::Memory& self, const py::array& keys, const py::array& values,
                const py::object& which) {
  const Cells cells = cells_of(which);
  if (cells.data()) knnmem::check_cells(cells.data(), cells.count(0), self.grid(), true);
  const int64_t G = cells.count(self.grid());
  const int64_t T = rows_of(keys);
  const float* k = checked_shape(keys, "keys", G, T, self.key_dim(),
                                 dims({named("grid", G), "T", named("key_dim", self.key_dim())}));
  const float* v =
      checked_shape(values, "values", G, T, self.value_dim(),
                    dims({named("grid", G), named("T", T), named("value_dim", self.value_dim())}));
  // Keys must stay finite in the stored format (save -> load round-trips
  // exactly what add accepted): the format's limit is the core's.
  const knnmem::KeyFormat f = self.key_format();
  const float limit = knnmem::max_key_magnitude(f);
  std::string what;
  if (limit < std::numeric_limits<float>::max()) {
    char buf[32];
    const auto r = std::to_chars(buf, buf + sizeof buf, limit);
    what = "values within +-" + std::string(buf, r.ptr) + " for " + knnmem::key_format_name(f) +
           " keys";
  }
  Staging staging(static_cast<std::size_t>(keys.size()), static_cast<std::size_t>(values.size()));
  const float* sk = staging.stage(0, k, keys, "keys", limit, what.empty() ? nullptr : what.c_str());
  const float* sv = staging.stage(1, v, values, "values");
  check_room(self.written().data(), G, T, "keys", cells.data());
  without_gil([&] { self.add(sk, sv, T, cells.data(), G); });
}

py::tuple memory_search(const knnmem::Memory& self, const py::array& queries, int64_t k,
                        double recall_target, const std::optional<py::tuple>& out,
                        const py::object& fields, const py::object& which,
                        const std::string& key_dtype, const std::string& value_dtype) {
  const Cells cells = cells_of(which);
  if (cells.data()) knnmem::check_cells(cells.data(), cells.count(0), self.grid(), false);
  const int64_t G = cells.count(self.grid());
  knnmem::check_search_options(k, recall_target, self.capacity());
  const Request req = parse_request(out, fields, key_dtype, value_dtype);
  const float* q = checked_input(queries, "queries", G, -1, self.key_dim(),
                                 dims({named("grid", G), "Q", named("key_dim", self.key_dim())}));
  const int64_t nq = rows_of(queries);
  return run_search(G, nq, k, self.key_dim(), self.value_dim(), req,
                    [&](const knnmem::SearchOutput& o) {
                      self.search(q, nq, k, recall_target, o, cells.data(), G);
                    });
}

void memory_clear(knnmem::Memory& self, std::optional<py::array_t<bool, py::array::c_style>> mask) {
  if (!mask) {
    self.clear(nullptr);
    return;
  }
  check_shape(*mask, "which", {self.grid()}, dims({named("grid", self.grid())}));
  self.clear(reinterpret_cast<const uint8_t*>(mask->data()));
}

// The stored state, for knnmem.Memory.save / load (docs/format.md).
py::tuple memory_export_state(const knnmem::Memory& self) {
  const py::ssize_t G = self.grid(), C = self.capacity();
  const knnmem::KeyFormat f = self.key_format();
  py::dtype key_dtype = f == knnmem::KeyFormat::kFloat32 ? py::dtype::of<float>()
                        : f == knnmem::KeyFormat::kInt8  ? py::dtype::of<int8_t>()
                                                         : py::dtype::of<uint16_t>();
  py::array keys(key_dtype, std::vector<py::ssize_t>{G, C, self.key_dim()});
  py::array values(py::dtype::of<float>(), std::vector<py::ssize_t>{G, C, self.value_dim()});
  py::array written(py::dtype::of<int64_t>(), std::vector<py::ssize_t>{G});
  py::object scale = py::none();
  knnmem::Memory::State out{keys.mutable_data(), nullptr,
                            static_cast<float*>(values.mutable_data()),
                            static_cast<int64_t*>(written.mutable_data())};
  if (f == knnmem::KeyFormat::kInt8) {
    py::array s(py::dtype::of<float>(), std::vector<py::ssize_t>{G, C});
    out.key_scale = static_cast<float*>(s.mutable_data());
    scale = s;
  }
  without_gil([&] { self.export_state(out); });
  return py::make_tuple(keys, scale, values, written);
}

void memory_import_state(knnmem::Memory& self, const py::array& keys, const py::object& key_scale,
                         const py::array& values, const py::array& written) {
  const int64_t G = self.grid(), C = self.capacity();
  const knnmem::KeyFormat f = self.key_format();
  auto check = [](const py::array& a, const char* name, py::dtype dtype,
                  const std::vector<int64_t>& shape) {
    std::string what = "(";
    for (std::size_t i = 0; i < shape.size(); ++i) {
      what += (i ? ", " : "") + std::to_string(shape[i]);
    }
    check_shape(a, name, shape, what + ")");
    const bool aligned = reinterpret_cast<uintptr_t>(a.data()) % a.itemsize() == 0;
    if (!a.dtype().is(dtype) || !(a.flags() & py::array::c_style) || !aligned) {
      throw InvalidArgument(std::string(name) + ": expected an aligned C-contiguous " +
                            std::string(py::str(dtype)) + " array, got " +
                            std::string(py::str(a.dtype())));
    }
  };
  check(keys, "keys",
        f == knnmem::KeyFormat::kFloat32 ? py::dtype::of<float>()
        : f == knnmem::KeyFormat::kInt8  ? py::dtype::of<int8_t>()
                                         : py::dtype::of<uint16_t>(),
        {G, C, self.key_dim()});
  check(values, "values", py::dtype::of<float>(), {G, C, self.value_dim()});
  check(written, "written", py::dtype::of<int64_t>(), {G});
  knnmem::Memory::State in{const_cast<void*>(keys.data()), nullptr,
                           static_cast<float*>(const_cast<void*>(values.data())),
                           static_cast<int64_t*>(const_cast<void*>(written.data()))};
  py::array scale;
  if (f == knnmem::KeyFormat::kInt8) {
    if (!py::isinstance<py::array>(key_scale)) {
      throw InvalidArgument("key_scale: expected a float32 array for int8 keys");
    }
    scale = py::reinterpret_borrow<py::array>(key_scale);
    check(scale, "key_scale", py::dtype::of<float>(), {G, C});
    in.key_scale = static_cast<float*>(const_cast<void*>(scale.data()));
  } else if (!key_scale.is_none()) {
    throw InvalidArgument("key_scale: expected None for " +
                          std::string(knnmem::key_format_name(f)) + " keys");
  }
  without_gil([&] { self.import_state(in); });
}

py::tuple ring_search(const py::array& keys, const py::array& values, const py::array& written,
                      const py::array& queries, int64_t k, double recall_target,
                      const std::string& metric, const std::string& precision,
                      const std::optional<py::tuple>& out, const py::object& fields,
                      const py::object& which, const std::string& key_dtype,
                      const std::string& value_dtype) {
  RingArrays ring = ring_view(keys, values, written, false);
  const Cells cells = cells_of(which);
  knnmem::MemoryView view = ring.view.as_const();
  if (cells.data()) {
    knnmem::check_cells(cells.data(), cells.count(0), view.grid, false);
    view.cells = cells.data();
    view.grid = cells.count(0);
  }
  const knnmem::Metric parsed = knnmem::parse_metric(metric);
  knnmem::SearchOptions options{k, recall_target, parsed};
  options.score_format = knnmem::parse_score_format(precision);
  knnmem::check_search_options(k, recall_target, view.capacity);
  const float* q =
      checked_input(queries, "queries", view.grid, -1, view.key_dim,
                    dims({named("grid", view.grid), "Q", named("key_dim", view.key_dim)}));
  const int64_t nq = rows_of(queries);
  const Request req = parse_request(out, fields, key_dtype, value_dtype);
  return run_search(
      view.grid, nq, k, view.key_dim, view.value_dim, req,
      [&](const knnmem::SearchOutput& o) { knnmem::search(view, q, nq, options, o); });
}

void ring_add(const py::array& keys, const py::array& values, const py::array& written,
              const py::array& new_keys, const py::array& new_values, const py::object& which) {
  RingArrays ring = ring_view(keys, values, written, true);
  const Cells cells = cells_of(which);
  knnmem::MutableMemoryView& view = ring.view;
  if (cells.data()) {
    knnmem::check_cells(cells.data(), cells.count(0), view.grid, true);
    view.cells = cells.data();
    view.grid = cells.count(0);
  }
  const int64_t T = rows_of(new_keys);
  const float* nk =
      checked_shape(new_keys, "new_keys", view.grid, T, view.key_dim,
                    dims({named("grid", view.grid), "T", named("key_dim", view.key_dim)}));
  const float* nv = checked_shape(
      new_values, "new_values", view.grid, T, view.value_dim,
      dims({named("grid", view.grid), named("T", T), named("value_dim", view.value_dim)}));
  Staging staging(static_cast<std::size_t>(new_keys.size()),
                  static_cast<std::size_t>(new_values.size()));
  const float* sk = staging.stage(0, nk, new_keys, "new_keys");
  const float* sv = staging.stage(1, nv, new_values, "new_values");
  check_room(view.written, view.grid, T, "written", view.cells);
  without_gil([&] { knnmem::add(view, sk, sv, T); });
}

py::tuple placement_tables(int64_t capacity) {
  auto p = knnmem::Placement::shared(capacity);
  py::array_t<int32_t> slot_of(capacity), offset_of(capacity);
  std::memcpy(slot_of.mutable_data(), p->slot_of(), sizeof(int32_t) * capacity);
  std::memcpy(offset_of.mutable_data(), p->offset_of(), sizeof(int32_t) * capacity);
  return py::make_tuple(slot_of, offset_of);
}

int64_t bins_for_search(int64_t k, double recall_target, const std::string& dtype) {
  return knnmem::bins_for_search(k, recall_target, knnmem::parse_key_format(dtype));
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "knnmem C++ core (see knnmem.Memory for the public API)";
  py::register_exception_translator(&translate_errors);

  py::class_<knnmem::Memory>(m, "Memory")
      .def(py::init(&memory_new), py::arg("grid"), py::arg("capacity"), py::arg("key_dim"),
           py::arg("value_dim"), py::arg("metric") = "ip", py::arg("dtype") = "float32")
      .def_property_readonly("dtype", &memory_dtype)
      .def_property_readonly("grid", &knnmem::Memory::grid)
      .def_property_readonly("capacity", &knnmem::Memory::capacity)
      .def_property_readonly("key_dim", &knnmem::Memory::key_dim)
      .def_property_readonly("value_dim", &knnmem::Memory::value_dim)
      .def_property_readonly("metric", &memory_metric)
      .def_property_readonly("nbytes", &knnmem::Memory::nbytes)
      .def_property_readonly("written", &memory_written)
      .def_property_readonly("count", &memory_count)
      .def("add", &memory_add, py::arg("keys"), py::arg("values"), py::arg("which") = py::none())
      .def("search", &memory_search, py::arg("queries"), py::arg("k"), py::arg("recall_target"),
           py::arg("out") = py::none(), py::arg("fields") = py::none(),
           py::arg("which") = py::none(), py::arg("key_dtype") = "float32",
           py::arg("value_dtype") = "float32")
      .def("clear", &memory_clear, py::arg("mask") = py::none())
      .def("_export_state", &memory_export_state)
      .def("_import_state", &memory_import_state, py::arg("keys"), py::arg("key_scale"),
           py::arg("values"), py::arg("written"));

  m.def("search", &ring_search, py::arg("keys"), py::arg("values"), py::arg("written"),
        py::arg("queries"), py::arg("k"), py::arg("recall_target"), py::arg("metric"),
        py::arg("precision") = "float32", py::arg("out") = py::none(),
        py::arg("fields") = py::none(), py::arg("which") = py::none(),
        py::arg("key_dtype") = "float32", py::arg("value_dtype") = "float32",
        "Search a caller-owned ring (keys [G, C, d], values [G, C, dv], written [G]).");
  m.def("add", &ring_add, py::arg("keys"), py::arg("values"), py::arg("written"),
        py::arg("new_keys"), py::arg("new_values"), py::arg("which") = py::none(),
        "Append rows to a caller-owned ring, in place.");
  m.def("placement", &placement_tables, py::arg("capacity"),
        "(slot_of, offset_of): slot of stream offset r = p mod capacity, and its inverse.");
  m.def("check_search_options", &knnmem::check_search_options, py::arg("k"),
        py::arg("recall_target"), py::arg("capacity"),
        "The core's rules for k and recall_target (ValueError naming the argument).");
  m.def("expected_recall", &knnmem::expected_recall, py::arg("num_bins"), py::arg("k"));
  m.def("bins_for_recall", &knnmem::bins_for_recall, py::arg("k"), py::arg("recall_target"));
  m.def("bins_for_search", &bins_for_search, py::arg("k"), py::arg("recall_target"),
        py::arg("dtype") = "float32");
  m.def("set_num_threads", &knnmem::set_num_threads, py::arg("num_threads"));
  m.def("set_kernel", &knnmem::set_kernel, py::arg("name"),
        "Force a CPU kernel variant (a name of supported_kernels()); '' = automatic.");
  m.def("get_kernel", &knnmem::get_kernel);
  m.def("supported_kernels", &knnmem::supported_kernels);
  m.def("get_num_threads", &knnmem::get_num_threads);
  m.attr("PLACEMENT_BLOCK") = knnmem::Placement::kPlacementBlock;
}
