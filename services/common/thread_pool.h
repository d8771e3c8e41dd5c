// ThreadPool: a fixed set of threads running queued closures, with a bounded queue.
//
// gRPC reactors hand their compute here so that no gRPC thread ever blocks. TrySchedule
// refuses work when the queue is full (the caller answers RESOURCE_EXHAUSTED). The destructor
// runs what is queued, then joins. Thread-safe.
#pragma once

#include <deque>
#include <functional>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace moemesh {

class ThreadPool {
 public:
  ThreadPool(int threads, size_t max_queue);
  ~ThreadPool();
  // False when the queue is full or the pool is stopping.
  bool TrySchedule(std::function<void()> fn);
  size_t queued() const;
  int busy() const;

 private:
  void Work();
  const size_t max_queue_;
  mutable absl::Mutex mu_;
  std::deque<std::function<void()>> queue_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  int busy_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<std::thread> threads_;
};

}  // namespace moemesh
