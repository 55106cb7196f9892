// Internal invariants: a failed KNNMEM_ASSERT is a bug in knnmem, never a user
// error, so it aborts with the location instead of throwing.
#pragma once

#include <cstdio>
#include <cstdlib>

#define KNNMEM_ASSERT(cond)                                                                    \
  do {                                                                                         \
    if (!(cond)) {                                                                             \
      std::fprintf(stderr, "knnmem: internal error: %s (%s:%d)\n", #cond, __FILE__, __LINE__); \
      std::abort();                                                                            \
    }                                                                                          \
  } while (0)
