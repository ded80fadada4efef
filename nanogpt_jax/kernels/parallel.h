// Tasks 0 .. count-1 split over XLA's intra-op threads, for this folder's kernels.
//
// Tasks are handed to whichever thread asks next; the calling thread works too and then waits
// only for tasks other threads have taken, so a busy pool cannot stall it. It waits awake for a
// while before it sleeps: those tasks end within microseconds, and a decode step makes some 60
// such calls, each of which paid a wake-up when the caller slept at once (gpt2's 49 weight
// products of a batch-8 bfloat16 step: 9.7-14.1 ms a step asleep, 9.8-11.2 awake in most
// rounds; docs/results/cpu-parallel-awake-ab-zen4.txt).

#ifndef NANOGPT_JAX_KERNELS_PARALLEL_H_
#define NANOGPT_JAX_KERNELS_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace nanogpt_jax {

// How long parallel_for's caller waits awake for the other threads' tasks before it sleeps.
constexpr std::chrono::microseconds kAwake{200};

template <typename Task>
struct Tasks {
  Tasks(int64_t count, Task task) : count(count), task(std::move(task)) {}
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  const int64_t count;
  const Task task;
  std::mutex mutex;
  std::condition_variable finished;
};

template <typename Task>
void take_tasks(Tasks<Task>& tasks) {
  for (int64_t i; (i = tasks.next.fetch_add(1)) < tasks.count;) {
    tasks.task(i);
    if (tasks.done.fetch_add(1) + 1 == tasks.count) {
      std::lock_guard<std::mutex> lock(tasks.mutex);
      tasks.finished.notify_all();
    }
  }
}

// Runs task(i) for every i in [0, count), on this thread and the pool's; returns when all ran.
template <typename Task>
void parallel_for(xla::ffi::ThreadPool& pool, int64_t count, Task task) {
  if (count <= 0) return;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  auto tasks = std::make_shared<Tasks<Task>>(count, std::move(task));
  for (int64_t t = 1; t < std::min(threads, count); ++t) {
    pool.Schedule([tasks] { take_tasks(*tasks); });
  }
  take_tasks(*tasks);
  // yielding, so that on a busy machine a thread still running a task may have this core
  const auto give_up = std::chrono::steady_clock::now() + kAwake;
  while (tasks->done.load() != tasks->count && std::chrono::steady_clock::now() < give_up) {
    std::this_thread::yield();
  }
  std::unique_lock<std::mutex> lock(tasks->mutex);
  tasks->finished.wait(lock, [&] { return tasks->done.load() == tasks->count; });
}

}  // namespace nanogpt_jax

#endif  // NANOGPT_JAX_KERNELS_PARALLEL_H_
