// A child process gets a working engine (pthread_atfork).
//
// fork() copies only the thread that calls it. A lock held by another thread,
// or a pool worker, would be copied without its owner: the child's next add or
// clear would wait forever for a reader that does not exist there, and its
// thread pool would hand work to threads that are gone. So:
//   * before the fork, every Memory's lock is taken exclusively -- searches,
//     adds and clears in flight finish first, new ones wait -- then the
//     placement cache's, the thread pool's and the scratch cache's mutexes: the child copies every
//     memory between two calls and no shared structure mid-update;
//   * after it, the parent releases them all;
//   * the child sets every lock up anew, free (the condition variables too:
//     threads of the parent may have been waiting on them), and drops the
//     thread pool, whose workers it does not have; its first parallel call
//     starts a new one.
// A fork therefore waits for the calls in flight on Memory objects (not for
// searches of caller-owned rings, which hold no lock: the child simply does
// not have them).
#include "core/fork.hpp"

#include <pthread.h>

#include <condition_variable>
#include <mutex>
#include <new>
#include <set>

#include "core/block_cache.hpp"
#include "knnmem/knnmem.hpp"

namespace knnmem {
namespace detail {

struct ForkHandlers {
  static std::mutex& locks_mutex() {
    static std::mutex* const m = new std::mutex;  // never destroyed
    return *m;
  }
  static std::set<RWLock*>& locks() {
    static std::set<RWLock*>* const s = new std::set<RWLock*>;
    return *s;
  }

  static void prepare() {
    locks_mutex().lock();
    for (RWLock* l : locks()) l->lock();
    placements_before_fork();
    pool_before_fork();
    scratch_cache().before_fork();
  }
  static void parent() {
    scratch_cache().after_fork(false);
    pool_after_fork(false);
    placements_after_fork();
    for (RWLock* l : locks()) l->unlock();
    locks_mutex().unlock();
  }
  static void child() {
    scratch_cache().after_fork(true);
    pool_after_fork(true);
    placements_after_fork();
    for (RWLock* l : locks()) {
      // Fresh, free primitives: the parent's waiters are not in this process.
      new (&l->mutex_) std::mutex;
      new (&l->changed_) std::condition_variable;
      l->readers_ = 0;
      l->writers_waiting_ = 0;
      l->writing_ = false;
    }
    locks_mutex().unlock();
  }
};

void ensure_fork_handlers() {
  static const bool registered = [] {
    return pthread_atfork(&ForkHandlers::prepare, &ForkHandlers::parent, &ForkHandlers::child) == 0;
  }();
  (void)registered;
}

void register_lock(RWLock* lock) {
  ensure_fork_handlers();
  std::lock_guard<std::mutex> guard(ForkHandlers::locks_mutex());
  ForkHandlers::locks().insert(lock);
}

void unregister_lock(RWLock* lock) {
  std::lock_guard<std::mutex> guard(ForkHandlers::locks_mutex());
  ForkHandlers::locks().erase(lock);
}

}  // namespace detail

RWLock::RWLock() { detail::register_lock(this); }
RWLock::~RWLock() { detail::unregister_lock(this); }

}  // namespace knnmem
