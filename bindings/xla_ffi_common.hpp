// Helpers shared by the XLA FFI handlers (xla_ffi.cpp on CPU, xla_ffi_cuda.cpp
// on CUDA): the export macro, and shape/dtype checks that return ffi::Error
// messages naming the argument.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <sstream>
#include <string>

#include "xla/ffi/api/ffi.h"

#if defined(__GNUC__) || defined(__clang__)
#define KNNMEM_FFI_EXPORT __attribute__((visibility("default")))
#else
#define KNNMEM_FFI_EXPORT
#endif

namespace knnmem::ffi_common {

namespace ffi = xla::ffi;
using Dims = ffi::AnyBuffer::Dimensions;

inline std::string dims_str(Dims d) {
  std::ostringstream s;
  s << "(";
  for (std::size_t i = 0; i < d.size(); ++i) s << (i ? ", " : "") << d[i];
  s << (d.size() == 1 ? ",)" : ")");
  return s.str();
}

inline const char* dtype_name(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::PRED:
      return "bool";
    case ffi::DataType::S32:
      return "int32";
    case ffi::DataType::S64:
      return "int64";
    case ffi::DataType::F16:
      return "float16";
    case ffi::DataType::BF16:
      return "bfloat16";
    case ffi::DataType::F32:
      return "float32";
    case ffi::DataType::F64:
      return "float64";
    default:
      return "another dtype";
  }
}

inline ffi::Error invalid(const std::string& message) {
  return ffi::Error::InvalidArgument(message);
}

// `b` must be (*grid, tail...); tail entries < 0 match any size.
inline bool has_shape(Dims b, Dims grid, std::initializer_list<int64_t> tail) {
  if (b.size() != grid.size() + tail.size()) return false;
  for (std::size_t i = 0; i < grid.size(); ++i) {
    if (b[i] != grid[i]) return false;
  }
  std::size_t i = grid.size();
  for (int64_t t : tail) {
    if (t >= 0 && b[i] != t) return false;
    ++i;
  }
  return true;
}

}  // namespace knnmem::ffi_common
