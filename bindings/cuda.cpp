// knnmem._cuda: the CUDA kernels (csrc/cuda) for Python, in a module of their
// own so that `import knnmem` never needs the CUDA runtime. The runtime is
// linked statically: importing this module works on a machine without a GPU
// driver, and device_count() is then 0 with device_status() saying why.
//
// Two levels, as in the core:
//   * raw entry points on caller-owned device buffers in the ring layout
//     (pointers and the stream as integers), for knnmem.torch (tensor.data_ptr(),
//     torch.cuda.current_stream().cuda_stream) without compiling against torch;
//   * DeviceMemory, which owns the storage of a knnmem.Memory(device="cuda").
// Python (knnmem.cuda, knnmem.torch) checks shapes, dtypes, devices and
// finiteness before calling; the checks here are the ones only C++ can make.
#include <cuda_runtime.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/knnmem_cuda.hpp"
#include "gil.hpp"
#include "knnmem/knnmem.hpp"

namespace py = pybind11;
namespace kc = knnmem::cuda;

namespace {

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    if (err == cudaErrorMemoryAllocation) {
      cudaGetLastError();
      throw knnmem::AllocationError(std::string(what) + ": " + cudaGetErrorString(err));
    }
    throw std::runtime_error(std::string("knnmem CUDA ") + what + ": " + cudaGetErrorString(err));
  }
}

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

void* stream_of(uintptr_t s) { return reinterpret_cast<void*>(s); }

knnmem::Metric metric_of(const std::string& m) { return knnmem::parse_metric(m); }

// A device buffer that grows on demand (never per call once big enough).
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() {
    if (ptr_) cudaFree(ptr_);
  }
  void* reserve(int64_t bytes, const char* what) {
    if (bytes <= size_) return ptr_;
    if (ptr_) check(cudaFree(ptr_), what);  // cudaFree waits for work using it
    ptr_ = nullptr;
    size_ = 0;
    check(cudaMalloc(&ptr_, static_cast<size_t>(std::max<int64_t>(bytes, 256))), what);
    size_ = bytes;
    return ptr_;
  }
  void* get() const { return ptr_; }

 private:
  void* ptr_ = nullptr;
  int64_t size_ = 0;
};

// Makes `device` current for the scope of a call.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }

 private:
  int previous_ = 0;
};

int64_t checked_product(std::initializer_list<int64_t> sizes, const char* what) {
  int64_t n = 1;
  for (int64_t s : sizes) {
    if (s < 0 || __builtin_mul_overflow(n, s, &n)) {
      throw std::length_error(std::string(what) + ": size overflows a 64-bit byte count");
    }
  }
  return n;
}

// Storage of a knnmem.Memory(device="cuda"): the ring layout on one device,
// the placement tables, and staging buffers for host arrays. Host-array calls
// run on the legacy default stream and return when their results are on the
// host; device-pointer calls run on the caller's stream without waiting.
class DeviceMemory {
 public:
  DeviceMemory(int64_t grid, int64_t capacity, int64_t key_dim, int64_t value_dim,
               const std::string& metric, const std::string& dtype, int device)
      : grid_(grid),
        capacity_(capacity),
        key_dim_(key_dim),
        value_dim_(value_dim),
        metric_(metric_of(metric)),
        dtype_(kc::parse_key_dtype(dtype)),
        device_(device) {
    for (auto [v, name] : {std::pair{grid, "shape"}, std::pair{capacity, "capacity"},
                           std::pair{key_dim, "key_dim"}, std::pair{value_dim, "value_dim"}}) {
      if (v < 1) {
        throw knnmem::InvalidArgument(std::string(name) + ": expected an integer >= 1, got " +
                                      std::to_string(v));
      }
    }
    const int count = kc::device_count();
    if (device < 0 || device >= count) {
      throw knnmem::InvalidArgument("device: expected a CUDA device index in [0, " +
                                    std::to_string(count) + "), got " + std::to_string(device));
    }
    DeviceGuard guard(device_);
    const auto placement = knnmem::Placement::shared(capacity);
    const int64_t key_bytes =
        checked_product({grid, capacity, key_dim, kc::key_dtype_size(dtype_)}, "keys");
    const int64_t value_bytes = checked_product({grid, capacity, value_dim, 4}, "values");
    keys_.reserve(key_bytes, "keys");
    values_.reserve(value_bytes, "values");
    written_.reserve(8 * grid, "written");
    slot_of_.reserve(4 * capacity, "placement");
    offset_of_.reserve(4 * capacity, "placement");
    check(cudaMemset(keys_.get(), 0, static_cast<size_t>(key_bytes)), "keys");
    check(cudaMemset(values_.get(), 0, static_cast<size_t>(value_bytes)), "values");
    check(cudaMemset(written_.get(), 0, static_cast<size_t>(8 * grid)), "written");
    check(cudaMemcpy(slot_of_.get(), placement->slot_of(), static_cast<size_t>(4 * capacity),
                     cudaMemcpyHostToDevice),
          "placement");
    check(cudaMemcpy(offset_of_.get(), placement->offset_of(), static_cast<size_t>(4 * capacity),
                     cudaMemcpyHostToDevice),
          "placement");
    nbytes_ = key_bytes + value_bytes + 8 * grid + 8 * capacity;
  }

  int64_t grid() const { return grid_; }
  int64_t capacity() const { return capacity_; }
  int64_t key_dim() const { return key_dim_; }
  int64_t value_dim() const { return value_dim_; }
  int device() const { return device_; }
  int64_t nbytes() const { return nbytes_; }
  std::string metric() const { return knnmem::metric_name(metric_); }
  std::string dtype() const { return knnmem::key_format_name(dtype_); }
  uintptr_t keys_ptr() const { return reinterpret_cast<uintptr_t>(keys_.get()); }
  uintptr_t values_ptr() const { return reinterpret_cast<uintptr_t>(values_.get()); }
  uintptr_t written_ptr() const { return reinterpret_cast<uintptr_t>(written_.get()); }
  uintptr_t slot_of_ptr() const { return reinterpret_cast<uintptr_t>(slot_of_.get()); }
  uintptr_t offset_of_ptr() const { return reinterpret_cast<uintptr_t>(offset_of_.get()); }

  // new_keys [G][T][key_dim], new_values [G][T][value_dim]: device float32.
  void add_device(uintptr_t new_keys, uintptr_t new_values, int64_t num_rows, uintptr_t stream) {
    std::lock_guard<std::mutex> lock(mutex_);
    DeviceGuard guard(device_);
    kc::add(keys_.get(), dtype_, static_cast<float*>(values_.get()),
            static_cast<int64_t*>(written_.get()), static_cast<const int32_t*>(slot_of_.get()),
            grid_, capacity_, key_dim_, value_dim_, ptr<const float>(new_keys),
            ptr<const float>(new_values), num_rows, stream_of(stream));
  }

  void add_host(const float* new_keys, const float* new_values, int64_t num_rows) {
    std::lock_guard<std::mutex> lock(mutex_);
    DeviceGuard guard(device_);
    const int64_t kb = checked_product({grid_, num_rows, key_dim_, 4}, "keys");
    const int64_t vb = checked_product({grid_, num_rows, value_dim_, 4}, "values");
    auto* base = static_cast<char*>(stage_in_.reserve(kb + vb, "staging"));
    check(cudaMemcpyAsync(base, new_keys, static_cast<size_t>(kb), cudaMemcpyHostToDevice, 0),
          "copy keys");
    check(
        cudaMemcpyAsync(base + kb, new_values, static_cast<size_t>(vb), cudaMemcpyHostToDevice, 0),
        "copy values");
    kc::add(keys_.get(), dtype_, static_cast<float*>(values_.get()),
            static_cast<int64_t*>(written_.get()), static_cast<const int32_t*>(slot_of_.get()),
            grid_, capacity_, key_dim_, value_dim_, reinterpret_cast<const float*>(base),
            reinterpret_cast<const float*>(base + kb), num_rows, nullptr);
    check(cudaStreamSynchronize(0), "add");  // staging is reused by the next call
  }

  // Device queries [G][Q][key_dim] float32 and device outputs; on `stream`.
  void search_device(uintptr_t queries, int64_t num_queries, int64_t k, double recall_target,
                     uintptr_t scores, uintptr_t indices, uintptr_t mask, uintptr_t keys,
                     uintptr_t values, uintptr_t stream) {
    std::lock_guard<std::mutex> lock(mutex_);
    DeviceGuard guard(device_);
    const kc::SearchPlan plan =
        kc::plan_search(grid_, capacity_, key_dim_, num_queries, k, recall_target, dtype_);
    void* ws = workspace_.reserve(plan.workspace_bytes, "search workspace");
    kc::SearchOutput out{ptr<float>(scores), ptr<void>(indices), ptr<bool>(mask), ptr<float>(keys),
                         ptr<float>(values)};
    kc::search(ring(), ptr<const float>(queries), num_queries, k, metric_, plan, ws, out,
               stream_of(stream));
  }

  // Host queries; results copied into host arrays; returns when they are there.
  void search_host(const float* queries, int64_t num_queries, int64_t k, double recall_target,
                   float* scores, int64_t* indices, bool* mask, float* keys, float* values) {
    std::lock_guard<std::mutex> lock(mutex_);
    DeviceGuard guard(device_);
    const kc::SearchPlan plan =
        kc::plan_search(grid_, capacity_, key_dim_, num_queries, k, recall_target, dtype_);
    const int64_t n = checked_product({grid_, num_queries, k}, "results");
    const int64_t qb = checked_product({grid_, num_queries, key_dim_, 4}, "queries");
    const int64_t sizes[5] = {4 * n, 8 * n, n, checked_product({n, key_dim_, 4}, "keys"),
                              checked_product({n, value_dim_, 4}, "values")};
    auto round_up = [](int64_t b) { return (b + 255) / 256 * 256; };
    int64_t total = round_up(qb);
    for (int64_t s : sizes) total += round_up(s);
    auto* base = static_cast<char*>(stage_out_.reserve(total, "staging"));
    char* at[5];
    int64_t off = round_up(qb);
    for (int i = 0; i < 5; ++i) {
      at[i] = base + off;
      off += round_up(sizes[i]);
    }
    void* ws = workspace_.reserve(plan.workspace_bytes, "search workspace");
    check(cudaMemcpyAsync(base, queries, static_cast<size_t>(qb), cudaMemcpyHostToDevice, 0),
          "copy queries");
    kc::SearchOutput out{reinterpret_cast<float*>(at[0]), at[1], reinterpret_cast<bool*>(at[2]),
                         reinterpret_cast<float*>(at[3]), reinterpret_cast<float*>(at[4])};
    kc::search(ring(), reinterpret_cast<const float*>(base), num_queries, k, metric_, plan, ws, out,
               nullptr);
    void* host[5] = {scores, indices, mask, keys, values};
    for (int i = 0; i < 5; ++i) {
      check(
          cudaMemcpyAsync(host[i], at[i], static_cast<size_t>(sizes[i]), cudaMemcpyDeviceToHost, 0),
          "copy results");
    }
    check(cudaStreamSynchronize(0), "search");
  }

  // mask: device bool [G] or 0 for all; on `stream`.
  void clear_device(uintptr_t mask, uintptr_t stream) {
    std::lock_guard<std::mutex> lock(mutex_);
    DeviceGuard guard(device_);
    kc::clear(static_cast<int64_t*>(written_.get()), ptr<const bool>(mask), grid_,
              stream_of(stream));
  }

  void clear_host(const bool* mask) {
    std::lock_guard<std::mutex> lock(mutex_);
    DeviceGuard guard(device_);
    const bool* dmask = nullptr;
    if (mask) {
      auto* d = static_cast<bool*>(stage_in_.reserve(grid_, "staging"));
      check(cudaMemcpyAsync(d, mask, static_cast<size_t>(grid_), cudaMemcpyHostToDevice, 0),
            "copy mask");
      dmask = d;
    }
    kc::clear(static_cast<int64_t*>(written_.get()), dmask, grid_, nullptr);
    check(cudaStreamSynchronize(0), "clear");
  }

  std::vector<int64_t> written() {
    std::lock_guard<std::mutex> lock(mutex_);
    DeviceGuard guard(device_);
    std::vector<int64_t> out(static_cast<size_t>(grid_));
    check(cudaMemcpy(out.data(), written_.get(), static_cast<size_t>(8 * grid_),
                     cudaMemcpyDeviceToHost),
          "read counters");
    return out;
  }

 private:
  kc::RingView ring() const {
    kc::RingView r;
    r.keys = keys_.get();
    r.values = static_cast<const float*>(values_.get());
    r.written = written_.get();
    r.offset_of = static_cast<const int32_t*>(offset_of_.get());
    r.grid = grid_;
    r.capacity = capacity_;
    r.key_dim = key_dim_;
    r.value_dim = value_dim_;
    r.key_dtype = dtype_;
    return r;
  }

  int64_t grid_, capacity_, key_dim_, value_dim_;
  knnmem::Metric metric_;
  knnmem::KeyFormat dtype_;
  int device_;
  int64_t nbytes_ = 0;
  DeviceBuffer keys_, values_, written_, slot_of_, offset_of_;
  DeviceBuffer workspace_, stage_in_, stage_out_;
  std::mutex mutex_;
};

template <typename T>
using CArray = py::array_t<T, py::array::c_style>;

template <typename T>
T* data_of(CArray<T>& a, int64_t expected, const char* name) {
  if (a.size() != expected) {
    throw knnmem::InvalidArgument(std::string(name) + ": expected " + std::to_string(expected) +
                                  " elements, got " + std::to_string(a.size()));
  }
  return a.mutable_data();
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "knnmem CUDA kernels (see docs/cuda.md)";
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const knnmem::AllocationError& e) {
      PyErr_SetString(PyExc_MemoryError, e.what());
    }
  });

  m.def("device_count", &kc::device_count);
  m.def("device_status", &kc::device_status);
  m.def(
      "bins_for_search",
      [](int64_t k, double r, const std::string& dtype) {
        return knnmem::bins_for_search(k, r, kc::parse_key_dtype(dtype));
      },
      py::arg("k"), py::arg("recall_target"), py::arg("dtype"));
  m.def(
      "search_workspace_bytes",
      [](int64_t grid, int64_t capacity, int64_t key_dim, int64_t num_queries, int64_t k,
         double recall_target, const std::string& dtype) {
        return kc::plan_search(grid, capacity, key_dim, num_queries, k, recall_target,
                               kc::parse_key_dtype(dtype))
            .workspace_bytes;
      },
      py::arg("grid"), py::arg("capacity"), py::arg("key_dim"), py::arg("num_queries"),
      py::arg("k"), py::arg("recall_target"), py::arg("dtype"));
  m.def(
      "plan",
      [](int64_t grid, int64_t capacity, int64_t key_dim, int64_t num_queries, int64_t k,
         double recall_target, const std::string& dtype) {
        const kc::SearchPlan p = kc::plan_search(grid, capacity, key_dim, num_queries, k,
                                                 recall_target, kc::parse_key_dtype(dtype));
        py::dict d;
        d["num_bins"] = p.num_bins;
        d["bins"] = p.bins;
        d["splits"] = p.splits;
        d["split_len"] = p.split_len;
        d["query_chunk"] = p.query_chunk;
        d["workspace_bytes"] = p.workspace_bytes;
        return d;
      },
      py::arg("grid"), py::arg("capacity"), py::arg("key_dim"), py::arg("num_queries"),
      py::arg("k"), py::arg("recall_target"), py::arg("dtype"));

  // Raw entry points on caller-owned device buffers (ring layout). Device
  // pointers travel as integers; a search takes two descriptors, the ring and
  // its outputs, and keyword arguments, rather than two dozen positional ones.
  // module_local: the CUDA emulation (tests/cuda_emu) binds the same C++ types in a
  // module of its own, which may be loaded beside this one.
  py::class_<kc::RingView>(m, "Ring", py::module_local(),
                           "A caller-owned device ring (see knnmem_cuda.hpp).")
      .def(py::init([](uintptr_t keys, const std::string& dtype, uintptr_t values,
                       uintptr_t written, uintptr_t offset_of, int64_t grid, int64_t capacity,
                       int64_t key_dim, int64_t value_dim, bool written_int32) {
             kc::RingView r;
             r.keys = ptr<const void>(keys);
             r.key_dtype = kc::parse_key_dtype(dtype);
             r.values = ptr<const float>(values);
             r.written = ptr<const void>(written);
             r.written_is_int32 = written_int32;
             r.offset_of = ptr<const int32_t>(offset_of);
             r.grid = grid;
             r.capacity = capacity;
             r.key_dim = key_dim;
             r.value_dim = value_dim;
             return r;
           }),
           py::kw_only(), py::arg("keys"), py::arg("dtype"), py::arg("values"), py::arg("written"),
           py::arg("offset_of"), py::arg("grid"), py::arg("capacity"), py::arg("key_dim"),
           py::arg("value_dim"), py::arg("written_int32") = false);
  py::class_<kc::SearchOutput>(m, "Outputs", py::module_local(),
                               "Device result buffers of a search; keys/values 0: not gathered.")
      .def(py::init([](uintptr_t scores, uintptr_t indices, uintptr_t mask, uintptr_t keys,
                       uintptr_t values) {
             return kc::SearchOutput{ptr<float>(scores), ptr<void>(indices), ptr<bool>(mask),
                                     ptr<float>(keys), ptr<float>(values)};
           }),
           py::kw_only(), py::arg("scores"), py::arg("indices"), py::arg("mask"),
           py::arg("keys") = 0, py::arg("values") = 0);
  m.def(
      "search",
      [](const kc::RingView& ring, uintptr_t queries, int64_t num_queries, int64_t k,
         double recall_target, const std::string& metric, const kc::SearchOutput& out,
         uintptr_t workspace, int64_t workspace_bytes, uintptr_t stream, int device) {
        const knnmem::Metric met = metric_of(metric);
        const kc::SearchPlan plan = kc::plan_search(ring.grid, ring.capacity, ring.key_dim,
                                                    num_queries, k, recall_target, ring.key_dtype);
        if (workspace_bytes < plan.workspace_bytes) {
          throw knnmem::InvalidArgument("workspace: expected at least " +
                                        std::to_string(plan.workspace_bytes) + " bytes, got " +
                                        std::to_string(workspace_bytes));
        }
        knnmem_bindings::without_gil([&] {
          DeviceGuard guard(device);
          kc::search(ring, ptr<const float>(queries), num_queries, k, met, plan,
                     ptr<void>(workspace), out, stream_of(stream));
        });
      },
      py::arg("ring"), py::kw_only(), py::arg("queries"), py::arg("num_queries"), py::arg("k"),
      py::arg("recall_target"), py::arg("metric"), py::arg("out"), py::arg("workspace"),
      py::arg("workspace_bytes"), py::arg("stream"), py::arg("device"),
      "Search a caller-owned device ring (Ring) into device buffers (Outputs). Indices are "
      "int32 where the ring's written is (as XLA without x64 keeps them).");
  m.def(
      "add",
      [](uintptr_t keys, const std::string& dtype, uintptr_t values, uintptr_t written,
         uintptr_t slot_of, int64_t grid, int64_t capacity, int64_t key_dim, int64_t value_dim,
         uintptr_t new_keys, uintptr_t new_values, int64_t num_rows, uintptr_t stream, int device) {
        const knnmem::KeyFormat dt = kc::parse_key_dtype(dtype);
        knnmem_bindings::without_gil([&] {
          DeviceGuard guard(device);
          kc::add(ptr<void>(keys), dt, ptr<float>(values), ptr<int64_t>(written),
                  ptr<const int32_t>(slot_of), grid, capacity, key_dim, value_dim,
                  ptr<const float>(new_keys), ptr<const float>(new_values), num_rows,
                  stream_of(stream));
        });
      },
      py::arg("keys"), py::arg("dtype"), py::arg("values"), py::arg("written"), py::arg("slot_of"),
      py::arg("grid"), py::arg("capacity"), py::arg("key_dim"), py::arg("value_dim"),
      py::arg("new_keys"), py::arg("new_values"), py::arg("num_rows"), py::arg("stream"),
      py::arg("device"));
  m.def(
      "clear",
      [](uintptr_t written, uintptr_t mask, int64_t grid, uintptr_t stream, int device) {
        knnmem_bindings::without_gil([&] {
          DeviceGuard guard(device);
          kc::clear(ptr<int64_t>(written), ptr<const bool>(mask), grid, stream_of(stream));
        });
      },
      py::arg("written"), py::arg("mask"), py::arg("grid"), py::arg("stream"), py::arg("device"));

  py::class_<DeviceMemory>(m, "DeviceMemory")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, const std::string&, const std::string&,
                    int>(),
           py::arg("grid"), py::arg("capacity"), py::arg("key_dim"), py::arg("value_dim"),
           py::arg("metric"), py::arg("dtype"), py::arg("device"))
      .def_property_readonly("grid", &DeviceMemory::grid)
      .def_property_readonly("capacity", &DeviceMemory::capacity)
      .def_property_readonly("key_dim", &DeviceMemory::key_dim)
      .def_property_readonly("value_dim", &DeviceMemory::value_dim)
      .def_property_readonly("device", &DeviceMemory::device)
      .def_property_readonly("nbytes", &DeviceMemory::nbytes)
      .def_property_readonly("metric", &DeviceMemory::metric)
      .def_property_readonly("dtype", &DeviceMemory::dtype)
      .def_property_readonly("keys_ptr", &DeviceMemory::keys_ptr)
      .def_property_readonly("values_ptr", &DeviceMemory::values_ptr)
      .def_property_readonly("written_ptr", &DeviceMemory::written_ptr)
      .def_property_readonly("slot_of_ptr", &DeviceMemory::slot_of_ptr)
      .def_property_readonly("offset_of_ptr", &DeviceMemory::offset_of_ptr)
      .def_property_readonly("written",
                             [](DeviceMemory& self) {
                               std::vector<int64_t> w;
                               {
                                 knnmem_bindings::without_gil([&] { w = self.written(); });
                               }
                               return CArray<int64_t>(static_cast<py::ssize_t>(w.size()), w.data());
                             })
      .def("add_host",
           [](DeviceMemory& self, CArray<float> keys, CArray<float> values, int64_t num_rows) {
             const float* k = data_of(keys, self.grid() * num_rows * self.key_dim(), "keys");
             const float* v = data_of(values, self.grid() * num_rows * self.value_dim(), "values");
             knnmem_bindings::without_gil([&] { self.add_host(k, v, num_rows); });
           })
      .def("add_device",
           [](DeviceMemory& self, uintptr_t keys, uintptr_t values, int64_t num_rows,
              uintptr_t stream) {
             knnmem_bindings::without_gil([&] { self.add_device(keys, values, num_rows, stream); });
           })
      .def("search_host",
           [](DeviceMemory& self, CArray<float> queries, int64_t num_queries, int64_t k,
              double recall_target) {
             const int64_t g = self.grid();
             const float* q = data_of(queries, g * num_queries * self.key_dim(), "queries");
             const auto G = static_cast<py::ssize_t>(g), Q = static_cast<py::ssize_t>(num_queries),
                        K = static_cast<py::ssize_t>(k);
             CArray<float> scores({G, Q, K});
             CArray<int64_t> indices({G, Q, K});
             CArray<bool> mask({G, Q, K});
             CArray<float> keys({G, Q, K, static_cast<py::ssize_t>(self.key_dim())});
             CArray<float> values({G, Q, K, static_cast<py::ssize_t>(self.value_dim())});
             float* s = scores.mutable_data();
             int64_t* i = indices.mutable_data();
             bool* mk = mask.mutable_data();
             float* kk = keys.mutable_data();
             float* vv = values.mutable_data();
             {
               knnmem_bindings::without_gil(
                   [&] { self.search_host(q, num_queries, k, recall_target, s, i, mk, kk, vv); });
             }
             return py::make_tuple(scores, indices, keys, values, mask);
           })
      .def("search_device",
           [](DeviceMemory& self, uintptr_t queries, int64_t num_queries, int64_t k,
              double recall_target, uintptr_t scores, uintptr_t indices, uintptr_t mask,
              uintptr_t keys, uintptr_t values, uintptr_t stream) {
             knnmem_bindings::without_gil([&] {
               self.search_device(queries, num_queries, k, recall_target, scores, indices, mask,
                                  keys, values, stream);
             });
           })
      .def("clear_host",
           [](DeviceMemory& self, std::optional<CArray<bool>> mask) {
             const bool* m = mask ? data_of(*mask, self.grid(), "which") : nullptr;
             knnmem_bindings::without_gil([&] { self.clear_host(m); });
           })
      .def("clear_device", [](DeviceMemory& self, uintptr_t mask, uintptr_t stream) {
        knnmem_bindings::without_gil([&] { self.clear_device(mask, stream); });
      });
}
