// Export and import of a Memory's stored state (Memory::export_state,
// Memory::import_state), the core of save/load. The exchanged layout is
// logical -- rows oldest first, keys in their stored element type -- so files
// do not depend on the panel width or the placement permutation.
//
// import_state recomputes the derived per-slot terms (metric norm, int8 sum)
// with the same arithmetic as add() in memory.cpp; tests/test_persist.py
// checks that loaded memories search bit-identically for every key format
// and metric, so a change to one must be made to the other.
#include <cmath>
#include <cstring>
#include <mutex>
#include <shared_mutex>
#include <sstream>
#include <string>

#include "core/quantize.hpp"
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

bool bf16_finite(uint16_t h) { return (h & 0x7F80u) != 0x7F80u; }

}  // namespace

void Memory::export_state(const State& out) const {
  std::shared_lock<RWLock> lock(mutex_);
  const int64_t padded = padded_capacity(capacity_);
  const int64_t words = key_words(key_format_, key_dim_);
  const int64_t key_size = key_format_ == KeyFormat::kFloat32    ? 4
                           : key_format_ == KeyFormat::kBFloat16 ? 2
                                                                 : 1;
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
      if (key_format_ == KeyFormat::kFloat32) {
        const float* src = static_cast<const float*>(keys_) + panel * words + lane;
        float* dst = reinterpret_cast<float*>(key_row);
        for (int64_t d = 0; d < key_dim_; ++d) dst[d] = src[d * kPanelSlots];
      } else {
        const uint32_t* src = static_cast<const uint32_t*>(keys_) + panel * words + lane;
        if (key_format_ == KeyFormat::kBFloat16) {
          uint16_t* dst = reinterpret_cast<uint16_t*>(key_row);
          for (int64_t d = 0; d < key_dim_; ++d) {
            dst[d] = static_cast<uint16_t>(src[(d / 2) * kPanelSlots] >> (16 * (d % 2)));
          }
        } else {
          int8_t* dst = reinterpret_cast<int8_t*>(key_row);
          for (int64_t d = 0; d < key_dim_; ++d) {
            dst[d] = static_cast<int8_t>(src[(d / 4) * kPanelSlots] >> (8 * (d % 4)));
          }
          *scale = key_scale_[g * padded + slot];
        }
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
        if (!(std::isfinite(s) && s >= 0.0f)) {
          throw InvalidArgument(at("key_scale: expected a finite scale >= 0 at", g, i, -1));
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
    for (int64_t i = r0; i < std::min(r1, count); ++i) {
      const int64_t row = g * capacity_ + i;
      const int64_t slot = slot_of[(written - count + i) % capacity_];
      const int64_t lane = slot % kPanelSlots;
      const int64_t panel = g * padded + slot / kPanelSlots * kPanelSlots;
      float stored_sq = 0.0f;
      if (key_format_ == KeyFormat::kFloat32) {
        const float* src = static_cast<const float*>(in.keys) + row * key_dim_;
        float* dst = static_cast<float*>(keys_) + panel * words + lane;
        for (int64_t d = 0; d < key_dim_; ++d) dst[d * kPanelSlots] = src[d];
        stored_sq = cpu::squared_norm(src, key_dim_);
      } else if (key_format_ == KeyFormat::kBFloat16) {  // as add(): pairs, low half first
        const uint16_t* src = static_cast<const uint16_t*>(in.keys) + row * key_dim_;
        uint32_t* dst = static_cast<uint32_t*>(keys_) + panel * words + lane;
        for (int64_t w = 0; w < words; ++w) {
          const uint32_t lo_bits = src[2 * w];
          const uint32_t hi_bits = 2 * w + 1 < key_dim_ ? src[2 * w + 1] : 0u;
          dst[w * kPanelSlots] = lo_bits | (hi_bits << 16);
          const float lo = detail::from_bf16(static_cast<uint16_t>(lo_bits));
          const float hi = detail::from_bf16(static_cast<uint16_t>(hi_bits));
          stored_sq += lo * lo + hi * hi;
        }
      } else {  // int8: as add(), norms of the dequantised key
        const int8_t* src = static_cast<const int8_t*>(in.keys) + row * key_dim_;
        uint32_t* dst = static_cast<uint32_t*>(keys_) + panel * words + lane;
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
        for (int64_t d = 0; d < key_dim_; ++d) {
          const float x = detail::int8_at(dst, kPanelSlots, d, scale);
          stored_sq += x * x;
        }
      }
      std::memcpy(values_ + (g * capacity_ + slot) * value_dim_, in.values + row * value_dim_,
                  sizeof(float) * value_dim_);
      const float sq = stored_sq;
      key_aux_[g * padded + slot] = metric_ == Metric::kL2 ? sq
                                    : metric_ == Metric::kCosine
                                        ? (sq > 0.0f ? 1.0f / std::sqrt(sq) : 0.0f)
                                        : 0.0f;
    }
  });
  for (int64_t g = 0; g < grid_; ++g) written_[g] = in.written[g];
}

}  // namespace knnmem
