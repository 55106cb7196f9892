// Stream positions of slots (position_of_slot), shared by the public
// function and the search's result writer.
#pragma once

#include <cstdint>

#include "knnmem/knnmem.hpp"

namespace knnmem::detail {

// The stream position held by a slot of a memory that has `written` rows (-1:
// no live row), for many slots of one memory with the division by the capacity
// done once: the newest position p <= written - 1 with p mod capacity == r (the
// slot's offset) is in the last lap if r <= (written - 1) mod capacity, else in
// the one before.
class SlotPositions {
 public:
  SlotPositions(const Placement& placement, int64_t written)
      : offset_of_(placement.offset_of()), capacity_(placement.capacity()), written_(written) {
    if (written > 0) {
      laps_ = (written - 1) / capacity_;
      last_ = (written - 1) % capacity_;
    }
  }
  int64_t operator()(int64_t slot) const {
    const int64_t r = offset_of_[slot];
    if (r >= written_) return -1;
    return r + capacity_ * (r <= last_ ? laps_ : laps_ - 1);
  }

 private:
  const int32_t* offset_of_;
  int64_t capacity_, written_;
  int64_t laps_ = 0, last_ = 0;
};

}  // namespace knnmem::detail
