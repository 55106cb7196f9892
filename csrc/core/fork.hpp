// fork() support: the core's process-wide locks, taken before a fork and set up
// anew in the child (csrc/core/fork.cpp says why and how).
#pragma once

namespace knnmem {
class RWLock;
}

namespace knnmem::detail {

// Registers the pthread_atfork handlers (once; every entry point that creates
// threads or locks calls it).
void ensure_fork_handlers();

// Every RWLock is listed while it exists, so that a fork can quiesce them all.
void register_lock(RWLock* lock);
void unregister_lock(RWLock* lock);

// The hooks of the other global state, called by the fork handlers in this
// order before the fork and in reverse after it.
void placements_before_fork();
void placements_after_fork();
void pool_before_fork();
void pool_after_fork(bool child);

}  // namespace knnmem::detail
