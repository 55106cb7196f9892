// A fixed pool of worker threads shared by every call into the core.
//
// parallel_for(n, fn) runs fn(0..n-1) and returns when all have finished. The
// calling thread works on its own job too, so calls from several threads (or
// from inside a task) always make progress. The first exception thrown by a
// task is rethrown in the caller once every started task has finished.
#pragma once

#include <cstddef>
#include <functional>

namespace knnmem::detail {

void parallel_for(std::size_t num_tasks, const std::function<void(std::size_t)>& fn);

}  // namespace knnmem::detail
