// The check macro of the C++ tests: a failed condition is printed with its
// place and counted; main() ends with check_summary().
#pragma once

#include <cstdio>
#include <cstdlib>

namespace knnmem_test {

inline int failures = 0;

// Prints the count and returns main()'s exit status.
inline int check_summary() {
  std::printf(failures ? "%d checks failed\n" : "all checks passed\n", failures);
  return failures ? EXIT_FAILURE : EXIT_SUCCESS;
}

}  // namespace knnmem_test

#define CHECK(cond)                                                 \
  do {                                                              \
    if (!(cond)) {                                                  \
      std::printf("FAILED %s:%d: %s\n", __FILE__, __LINE__, #cond); \
      ++knnmem_test::failures;                                      \
    }                                                               \
  } while (0)
