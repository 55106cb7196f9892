#include "core/thread_pool.hpp"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "core/fork.hpp"
#include "knnmem/knnmem.hpp"

namespace knnmem {
namespace detail {
namespace {

struct Job {
  const std::function<void(std::size_t)>* fn = nullptr;
  std::size_t num_tasks = 0;
  std::atomic<std::size_t> next{0};
  std::size_t finished = 0;  // guarded by mutex
  std::exception_ptr error;  // guarded by mutex
  std::mutex mutex;
  std::condition_variable all_done;

  // Claims and runs tasks until none are left. Returns when this thread has
  // nothing more to take (others may still be running theirs).
  void work() {
    for (;;) {
      const std::size_t i = next.fetch_add(1);
      if (i >= num_tasks) return;
      std::exception_ptr caught;
      try {
        (*fn)(i);
      } catch (...) {
        caught = std::current_exception();
      }
      std::lock_guard<std::mutex> lock(mutex);
      if (caught && !error) error = caught;
      if (++finished == num_tasks) all_done.notify_all();
    }
  }
  bool exhausted() const { return next.load() >= num_tasks; }
};

class Pool {
 public:
  explicit Pool(int num_threads) { resize(num_threads); }
  ~Pool() { stop(); }

  int size() const { return static_cast<int>(workers_.size()) + 1; }

  void resize(int num_threads) {
    stop();
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = false;
    for (int i = 1; i < num_threads; ++i) workers_.emplace_back([this] { worker_loop(); });
  }

  void run(std::size_t num_tasks, const std::function<void(std::size_t)>& fn) {
    auto job = std::make_shared<Job>();
    job->fn = &fn;
    job->num_tasks = num_tasks;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      queue_.push_back(job);
    }
    wake_.notify_all();
    job->work();
    {
      std::unique_lock<std::mutex> lock(job->mutex);
      job->all_done.wait(lock, [&] { return job->finished == job->num_tasks; });
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = std::find(queue_.begin(), queue_.end(), job);
      if (it != queue_.end()) queue_.erase(it);
    }
    if (job->error) std::rethrow_exception(job->error);
  }

 private:
  void worker_loop() {
    for (;;) {
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] {
          while (!queue_.empty() && queue_.front()->exhausted()) queue_.pop_front();
          return stopping_ || !queue_.empty();
        });
        if (stopping_) return;
        job = queue_.front();
      }
      job->work();
    }
  }

  void stop() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
  }

  std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<std::shared_ptr<Job>> queue_;
  std::vector<std::thread> workers_;
  bool stopping_ = false;
};

int default_num_threads() {
  if (const char* env = std::getenv("KNNMEM_NUM_THREADS")) {
    const int n = std::atoi(env);
    if (n > 0) return n;
  }
  const unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(hw);
}

std::mutex g_pool_mutex;  // guards creation and resizing of the pool
Pool* g_pool = nullptr;   // never destroyed: workers may outlive static destructors

Pool& pool() {
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  if (g_pool == nullptr) {
    ensure_fork_handlers();  // once a process has workers, a fork must reset them
    g_pool = new Pool(default_num_threads());
  }
  return *g_pool;
}

}  // namespace

void pool_before_fork() { g_pool_mutex.lock(); }

void pool_after_fork(bool child) {
  // The child has none of the workers: the pool is dropped (not destroyed --
  // that would join threads that are not there) and the next call starts one.
  if (child) g_pool = nullptr;
  g_pool_mutex.unlock();
}

void parallel_for(std::size_t num_tasks, const std::function<void(std::size_t)>& fn) {
  if (num_tasks == 0) return;
  Pool& p = pool();
  if (num_tasks == 1 || p.size() == 1) {
    for (std::size_t i = 0; i < num_tasks; ++i) fn(i);
    return;
  }
  p.run(num_tasks, fn);
}

}  // namespace detail

void set_num_threads(int num_threads) {
  if (num_threads < 1) {
    throw InvalidArgument("num_threads: expected an integer >= 1, got " +
                          std::to_string(num_threads));
  }
  detail::Pool& p = detail::pool();
  std::lock_guard<std::mutex> lock(detail::g_pool_mutex);
  if (p.size() != num_threads) p.resize(num_threads);
}

int get_num_threads() { return detail::pool().size(); }

}  // namespace knnmem
