// Export and import of a Memory's stored state (Memory::export_state,
// Memory::import_state), the core of save/load. The exchanged layout is
// logical -- rows oldest first, keys in their stored element type -- so files
// do not depend on the panel width or the placement permutation.
//
// import_state writes float32, bfloat16 and float16 keys through the same
// detail::store_key as add() (the stored values round-trip exactly through
// float32), and int8 keys with the norm arithmetic of store_key, so the derived
// per-slot terms (norms, int8 sums) come out bit-identical; tests/test_persist.py
// checks that loaded memories search bit-identically for every format and metric.
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <shared_mutex>
#include <sstream>
#include <string>
#include <vector>

#include "core/quantize.hpp"
#include "core/store_key.hpp"
#include "core/thread_pool.hpp"
#include "cpu/kernels.hpp"
#include "knnmem/knnmem.hpp"

namespace knnmem {
namespace {

constexpr int64_t kStateChunk = 4096;  // rows per task

// Runs fn(g, row_begin, row_end) over [grid][capacity] in parallel chunks.
template <class Fn>
void for_rows(int64_t grid, int64_t capacity, Fn&& fn) {
  const int64_t chunks = (capacity + kStateChunk - 1) / kStateChunk;
  detail::parallel_for(static_cast<std::size_t>(grid * chunks), [&](std::size_t i) {
    const int64_t g = static_cast<int64_t>(i) / chunks;
    const int64_t r0 = (static_cast<int64_t>(i) % chunks) * kStateChunk;
    fn(g, r0, std::min(capacity, r0 + kStateChunk));
  });
}

std::string at(const char* name, int64_t g, int64_t row, int64_t d) {
  std::ostringstream s;
  s << name << " [" << g << ", " << row;
  if (d >= 0) s << ", " << d;
  s << "]";
  return s.str();
}

// The largest int8 scale whose key scale * 127 is finite in float32.
const float kMaxInt8Scale = std::nextafter(std::numeric_limits<float>::max() / 127.0f, 0.0f);

bool bf16_finite(uint16_t h) { return (h & 0x7F80u) != 0x7F80u; }

int64_t key_bytes(KeyFormat format) {
  return format == KeyFormat::kFloat32 ? 4 : format == KeyFormat::kInt8 ? 1 : 2;
}

}  // namespace

void Memory::export_state(const State& out) const {
  std::shared_lock<RWLock> lock(mutex_);
  const int64_t padded = padded_capacity(capacity_);
  const int64_t words = key_words(key_format_, key_dim_);
  const int64_t key_size = key_bytes(key_format_);
  const int32_t* slot_of = placement_->slot_of();
  std::memcpy(out.written, written_.data(), sizeof(int64_t) * grid_);
  for_rows(grid_, capacity_, [&](int64_t g, int64_t r0, int64_t r1) {
    const int64_t written = written_[g];
    const int64_t count = std::min(written, capacity_);
    for (int64_t i = r0; i < r1; ++i) {
      char* key_row = static_cast<char*>(out.keys) + (g * capacity_ + i) * key_dim_ * key_size;
      float* value_row = out.values + (g * capacity_ + i) * value_dim_;
      float* scale = out.key_scale ? out.key_scale + g * capacity_ + i : nullptr;
      if (i >= count) {
        std::memset(key_row, 0, static_cast<std::size_t>(key_dim_ * key_size));
        std::memset(value_row, 0, sizeof(float) * value_dim_);
        if (scale) *scale = 0.0f;
        continue;
      }
      const int64_t slot = slot_of[(written - count + i) % capacity_];
      const int64_t lane = slot % kPanelSlots;
      const int64_t panel = g * padded + slot / kPanelSlots * kPanelSlots;
      const uint32_t* words_at = static_cast<const uint32_t*>(keys_) + panel * words;
      if (key_format_ == KeyFormat::kFloat32) {
        const float* src = reinterpret_cast<const float*>(words_at) + lane;
        float* dst = reinterpret_cast<float*>(key_row);
        for (int64_t d = 0; d < key_dim_; ++d) dst[d] = src[d * kPanelSlots];
      } else if (key_format_ == KeyFormat::kFloat16) {  // [dim rounded up to even][16] halves
        const uint16_t* src = reinterpret_cast<const uint16_t*>(words_at) + lane;
        uint16_t* dst = reinterpret_cast<uint16_t*>(key_row);
        for (int64_t d = 0; d < key_dim_; ++d) dst[d] = src[d * kPanelSlots];
      } else if (key_format_ == KeyFormat::kBFloat16) {
        const uint32_t* src = words_at + lane;
        uint16_t* dst = reinterpret_cast<uint16_t*>(key_row);
        for (int64_t d = 0; d < key_dim_; ++d) {
          dst[d] = detail::bf16_dim(src, kPanelSlots, d);
        }
      } else {
        const uint32_t* src = words_at + lane;
        int8_t* dst = reinterpret_cast<int8_t*>(key_row);
        for (int64_t d = 0; d < key_dim_; ++d) {
          dst[d] = detail::int8_dim(src, kPanelSlots, d);
        }
        *scale = key_scale_[g * padded + slot];
      }
      std::memcpy(value_row, values_ + (g * capacity_ + slot) * value_dim_,
                  sizeof(float) * value_dim_);
    }
  });
}

void Memory::import_state(const State& in) {
  if (in.keys == nullptr || in.values == nullptr || in.written == nullptr ||
      (key_format_ == KeyFormat::kInt8) != (in.key_scale != nullptr)) {
    throw InvalidArgument("state: expected keys, values, written" +
                          std::string(key_format_ == KeyFormat::kInt8 ? " and key_scale" : ""));
  }
  // Check everything before changing anything.
  for (int64_t g = 0; g < grid_; ++g) {
    if (in.written[g] < 0) {
      throw InvalidArgument("written: expected counts >= 0, got " + std::to_string(in.written[g]) +
                            " at index [" + std::to_string(g) + "]");
    }
    const int64_t count = std::min(in.written[g], capacity_);
    for (int64_t i = 0; i < count; ++i) {
      const int64_t row = g * capacity_ + i;
      for (int64_t d = 0; d < value_dim_; ++d) {
        if (!std::isfinite(in.values[row * value_dim_ + d])) {
          throw InvalidArgument(at("values: expected finite values, got a NaN or Inf at", g, i, d));
        }
      }
      for (int64_t d = 0; d < key_dim_; ++d) {
        const int64_t e = row * key_dim_ + d;
        bool ok;
        if (key_format_ == KeyFormat::kFloat32) {
          ok = std::isfinite(static_cast<const float*>(in.keys)[e]);
        } else if (key_format_ == KeyFormat::kBFloat16) {
          ok = bf16_finite(static_cast<const uint16_t*>(in.keys)[e]);
        } else if (key_format_ == KeyFormat::kFloat16) {
          ok = (static_cast<const uint16_t*>(in.keys)[e] & 0x7C00u) != 0x7C00u;
        } else {
          ok = static_cast<const int8_t*>(in.keys)[e] != -128;
        }
        if (!ok) {
          throw InvalidArgument(at(key_format_ == KeyFormat::kInt8
                                       ? "keys: expected int8 values in [-127, 127], got -128 at"
                                       : "keys: expected finite values, got a NaN or Inf at",
                                   g, i, d));
        }
      }
      if (in.key_scale) {
        const float s = in.key_scale[row];
        // add() keeps amax / 127 within this (bindings refuse |key| = FLT_MAX), so
        // scale * 127, the largest key a scale gives, is finite.
        if (!(s >= 0.0f && s <= kMaxInt8Scale)) {
          std::ostringstream what;
          what << "key_scale: expected a scale in [0, " << kMaxInt8Scale << "], got " << s << " at";
          throw InvalidArgument(at(what.str().c_str(), g, i, -1));
        }
      }
    }
  }

  std::unique_lock<RWLock> lock(mutex_);
  const int64_t padded = padded_capacity(capacity_);
  const int64_t words = key_words(key_format_, key_dim_);
  const int32_t* slot_of = placement_->slot_of();
  for_rows(grid_, capacity_, [&](int64_t g, int64_t r0, int64_t r1) {
    const int64_t written = in.written[g];
    const int64_t count = std::min(written, capacity_);
    std::vector<float> row_buf(static_cast<std::size_t>(key_dim_));
    for (int64_t i = r0; i < std::min(r1, count); ++i) {
      const int64_t row = g * capacity_ + i;
      const int64_t slot = slot_of[(written - count + i) % capacity_];
      const int64_t lane = slot % kPanelSlots;
      const int64_t panel = g * padded + slot / kPanelSlots * kPanelSlots;
      void* panel_at = static_cast<uint32_t*>(keys_) + panel * words;
      float stored_sq;
      if (key_format_ != KeyFormat::kInt8) {  // the stored values round-trip through float32
        for (int64_t d = 0; d < key_dim_; ++d) {
          const int64_t e = row * key_dim_ + d;
          const uint16_t* half = static_cast<const uint16_t*>(in.keys);
          row_buf[d] = key_format_ == KeyFormat::kFloat32
                           ? static_cast<const float*>(in.keys)[e]
                           : (key_format_ == KeyFormat::kBFloat16 ? detail::from_bf16(half[e])
                                                                  : detail::from_f16(half[e]));
        }
        stored_sq = detail::store_key(key_format_, row_buf.data(), key_dim_, panel_at, lane,
                                      nullptr, nullptr, true);
      } else {  // int8: q and scale as given, the norm as store_key computes it
        const int8_t* src = static_cast<const int8_t*>(in.keys) + row * key_dim_;
        uint32_t* dst = static_cast<uint32_t*>(panel_at) + lane;
        int32_t sum = 0;
        for (int64_t w = 0; w < words; ++w) {
          uint32_t word = 0;
          for (int64_t b = 0; b < 4 && 4 * w + b < key_dim_; ++b) {
            sum += src[4 * w + b];
            word |= static_cast<uint32_t>(static_cast<uint8_t>(src[4 * w + b])) << (8 * b);
          }
          dst[w * kPanelSlots] = word;
        }
        const float scale = in.key_scale[row];
        key_scale_[g * padded + slot] = scale;
        key_sum_[g * padded + slot] = sum;
        stored_sq = detail::sum_squares(key_dim_, [&](int64_t i) {
          return static_cast<float>(detail::int8_dim(dst, kPanelSlots, i)) * scale;
        });
      }
      std::memcpy(values_ + (g * capacity_ + slot) * value_dim_, in.values + row * value_dim_,
                  sizeof(float) * value_dim_);
      key_aux_[g * padded + slot] = detail::aux_of(metric_, stored_sq);
    }
  });
  for (int64_t g = 0; g < grid_; ++g) written_[g] = in.written[g];
}

}  // namespace knnmem
