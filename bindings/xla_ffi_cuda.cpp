// XLA FFI CUDA handler of knnmem.jax: the CUDA search (csrc/cuda) on XLA's
// device buffers, on XLA's stream. Compiled into knnmem._cuda when both nvcc
// and jaxlib's FFI headers are found; knnmem.jax registers it for
// platform="CUDA".
//
// Operands (the ring layout of bindings/xla_ffi.cpp, plus the placement table):
//   keys [*grid, capacity, key_dim] f32 | bf16 | f16, values [..., value_dim] f32,
//   written [*grid] s32 | s64, queries [*grid, Q, key_dim] f32,
//   offset_of [capacity] s32 (knnmem.ops.placement(capacity)[1]).
// Results: scores, indices (dtype of written), keys f32, values f32, mask pred,
// as the CPU handler, then a u8 workspace of
// knnmem._cuda.search_workspace_bytes(...) bytes (XLA allocates it with the
// other results: nothing is allocated per call here).
//
// Shapes, dtypes and attributes are checked here and returned as ffi::Error.
// Values that live on the device (finiteness of queries, written >= 0) cannot
// be checked without synchronising with the host, which this handler never
// does; knnmem.jax documents that.
#include <cuda_runtime.h>

#include <cstdint>
#include <exception>
#include <limits>
#include <sstream>
#include <string>
#include <string_view>

#include "cuda/knnmem_cuda.hpp"
#include "knnmem/knnmem.hpp"
#include "xla/ffi/api/ffi.h"
#include "xla_ffi_common.hpp"

namespace ffi = xla::ffi;

extern "C" KNNMEM_FFI_EXPORT XLA_FFI_Error* KnnmemSearchCuda(XLA_FFI_CallFrame* call_frame);
extern "C" KNNMEM_FFI_EXPORT int64_t KnnmemCudaFfiAbiVersion();

namespace {

using namespace knnmem::ffi_common;  // NOLINT: Dims, dims_str, invalid, has_shape

ffi::Error SearchCudaImpl(cudaStream_t stream, ffi::AnyBuffer keys, ffi::AnyBuffer values,
                          ffi::AnyBuffer written, ffi::AnyBuffer queries, ffi::AnyBuffer offset_of,
                          ffi::Result<ffi::AnyBuffer> out_scores,
                          ffi::Result<ffi::AnyBuffer> out_indices,
                          ffi::Result<ffi::AnyBuffer> out_keys,
                          ffi::Result<ffi::AnyBuffer> out_values,
                          ffi::Result<ffi::AnyBuffer> out_mask,
                          ffi::Result<ffi::AnyBuffer> workspace, int64_t k, double recall_target,
                          std::string_view metric_name) {
  try {
    namespace kc = knnmem::cuda;
    knnmem::KeyFormat dtype;
    switch (keys.element_type()) {
      case ffi::DataType::F32:
        dtype = knnmem::KeyFormat::kFloat32;
        break;
      case ffi::DataType::BF16:
        dtype = knnmem::KeyFormat::kBFloat16;
        break;
      case ffi::DataType::F16:
        dtype = knnmem::KeyFormat::kFloat16;
        break;
      default:
        return invalid("keys: expected dtype float32, bfloat16 or float16");
    }
    if (values.element_type() != ffi::DataType::F32) return invalid("values: expected float32");
    if (queries.element_type() != ffi::DataType::F32) return invalid("queries: expected float32");
    if (offset_of.element_type() != ffi::DataType::S32) {
      return invalid("offset_of: expected int32");
    }
    const ffi::DataType index_type = written.element_type();
    if (index_type != ffi::DataType::S32 && index_type != ffi::DataType::S64) {
      return invalid("written: expected dtype int32 or int64");
    }
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
    if (!has_shape(vd, grid, {capacity, -1}) || vd[vd.size() - 1] < 1) {
      return invalid("values: expected shape (*grid, capacity, value_dim), got " + dims_str(vd));
    }
    const int64_t value_dim = vd[vd.size() - 1];
    if (!has_shape(written.dimensions(), grid, {})) {
      return invalid("written: expected shape grid, got " + dims_str(written.dimensions()));
    }
    const Dims qd = queries.dimensions();
    if (!has_shape(qd, grid, {-1, key_dim})) {
      return invalid("queries: expected shape (*grid, Q, key_dim), got " + dims_str(qd));
    }
    if (offset_of.dimensions().size() != 1 || offset_of.dimensions()[0] != capacity) {
      return invalid("offset_of: expected shape (capacity,), got " +
                     dims_str(offset_of.dimensions()));
    }
    const int64_t nq = qd[qd.size() - 2];
    const knnmem::Metric metric = knnmem::parse_metric(std::string(metric_name));
    int64_t G = 1;
    for (int64_t g : grid) G *= g;
    const kc::SearchPlan plan =
        kc::plan_search(G, capacity, key_dim, nq, k, recall_target, dtype);  // checks k, recall
    struct Expected {
      ffi::Result<ffi::AnyBuffer>* buf;
      const char* name;
      ffi::DataType dtype;
      int64_t last;
    };
    const Expected expected[] = {
        {&out_scores, "scores", ffi::DataType::F32, -1},
        {&out_indices, "indices", index_type, -1},
        {&out_keys, "result keys", ffi::DataType::F32, key_dim},
        {&out_values, "result values", ffi::DataType::F32, value_dim},
        {&out_mask, "mask", ffi::DataType::PRED, -1},
    };
    for (const Expected& r : expected) {
      const Dims rd = (*r.buf)->dimensions();
      const bool ok =
          (*r.buf)->element_type() == r.dtype &&
          (r.last < 0 ? has_shape(rd, grid, {nq, k}) : has_shape(rd, grid, {nq, k, r.last}));
      if (!ok) return invalid(std::string(r.name) + ": unexpected result type " + dims_str(rd));
    }
    if (static_cast<int64_t>(workspace->size_bytes()) < plan.workspace_bytes) {
      return invalid("workspace: expected at least " + std::to_string(plan.workspace_bytes) +
                     " bytes, got " + std::to_string(workspace->size_bytes()));
    }
    if (G == 0 || nq == 0) return ffi::Error::Success();

    kc::RingView ring;
    ring.keys = keys.untyped_data();
    ring.values = values.typed_data<float>();
    ring.written = written.untyped_data();
    ring.written_is_int32 = index_type == ffi::DataType::S32;
    ring.offset_of = offset_of.typed_data<int32_t>();
    ring.grid = G;
    ring.capacity = capacity;
    ring.key_dim = key_dim;
    ring.value_dim = value_dim;
    ring.key_dtype = dtype;
    kc::SearchOutput out{out_scores->typed_data<float>(), out_indices->untyped_data(),
                         out_mask->typed_data<bool>(), out_keys->typed_data<float>(),
                         out_values->typed_data<float>()};
    kc::search(ring, queries.typed_data<float>(), nq, k, metric, plan, workspace->untyped_data(),
               out, stream);
    return ffi::Error::Success();
  } catch (const knnmem::InvalidArgument& e) {
    return ffi::Error::InvalidArgument(e.what());
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("knnmem CUDA search: ") + e.what());
  } catch (...) {
    return ffi::Error::Internal("knnmem CUDA search: unknown error");
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KnnmemSearchCuda, SearchCudaImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()  // keys
                                  .Arg<ffi::AnyBuffer>()  // values
                                  .Arg<ffi::AnyBuffer>()  // written
                                  .Arg<ffi::AnyBuffer>()  // queries
                                  .Arg<ffi::AnyBuffer>()  // offset_of
                                  .Ret<ffi::AnyBuffer>()  // scores
                                  .Ret<ffi::AnyBuffer>()  // indices
                                  .Ret<ffi::AnyBuffer>()  // keys
                                  .Ret<ffi::AnyBuffer>()  // values
                                  .Ret<ffi::AnyBuffer>()  // mask
                                  .Ret<ffi::AnyBuffer>()  // workspace
                                  .Attr<int64_t>("k")
                                  .Attr<double>("recall_target")
                                  .Attr<std::string_view>("metric"));

int64_t KnnmemCudaFfiAbiVersion() { return 1; }
