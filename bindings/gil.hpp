// Running core work without the GIL, safely at interpreter exit.
//
// pybind11's gil_scoped_release takes the GIL back in its destructor. If the
// interpreter exits while the thread is inside the core (a daemon thread in a
// search, say), Python 3.11-3.13 end that thread from inside the call that
// takes the GIL back (pthread_exit: a forced unwind), and a forced unwind out
// of a destructor is std::terminate -- the process aborts. Here the GIL is
// taken back by a plain call, and a thread that Python ends there is parked
// until the process is gone (what Python 3.14 does with such threads): no
// abort, and no destructor of a Python object runs without the GIL.
#pragma once

#include <cxxabi.h>
#include <pybind11/pybind11.h>
#include <unistd.h>

#include <exception>
#include <optional>
#include <type_traits>
#include <utility>

namespace knnmem_bindings {

inline void take_gil_back(PyThreadState* state) {
  try {
    PyEval_RestoreThread(state);
  } catch (abi::__forced_unwind&) {
    for (;;) pause();  // the interpreter is exiting: this thread never runs again
  }
}

// fn() with the GIL released; its result or exception once the GIL is back.
template <class Fn>
auto without_gil(Fn&& fn) -> decltype(fn()) {
  PyThreadState* state = PyEval_SaveThread();
  std::exception_ptr error;
  if constexpr (std::is_void_v<decltype(fn())>) {
    try {
      std::forward<Fn>(fn)();
    } catch (...) {
      error = std::current_exception();
    }
    take_gil_back(state);
    if (error) std::rethrow_exception(error);
  } else {
    std::optional<decltype(fn())> result;
    try {
      result.emplace(std::forward<Fn>(fn)());
    } catch (...) {
      error = std::current_exception();
    }
    take_gil_back(state);
    if (error) std::rethrow_exception(error);
    return std::move(*result);
  }
}

}  // namespace knnmem_bindings
