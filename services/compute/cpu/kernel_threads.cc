#include "services/compute/cpu/kernel_threads.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

namespace moemesh::cpu {
namespace {
std::atomic<int> g_requested_threads{0};
}  // namespace

struct KernelThreads::Impl {
  int threads = 1;
  std::mutex region;  // held by the caller for the whole of a parallel region
  std::mutex mu;
  std::condition_variable wake, done;
  uint64_t generation = 0;  // bumped per region
  const std::function<void(int64_t, int64_t)>* fn = nullptr;
  int64_t n = 0, grain = 1;
  std::atomic<int64_t> next{0};
  int active = 0;  // workers still inside the current region
  int wanted = 0;  // workers taking part in the current region
  std::vector<std::thread> workers;

  void RunChunks() {
    for (;;) {
      const int64_t b = next.fetch_add(grain);
      if (b >= n) return;
      (*fn)(b, std::min(n, b + grain));
    }
  }

  void Work(int index) {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> l(mu);
        wake.wait(l, [&] { return generation != seen; });
        seen = generation;
        if (index >= wanted) continue;
      }
      RunChunks();
      std::lock_guard<std::mutex> l(mu);
      if (--active == 0) done.notify_one();
    }
  }
};

KernelThreads::KernelThreads(int threads) : impl_(new Impl) {
  impl_->threads = std::max(1, threads);
  for (int i = 0; i + 1 < impl_->threads; ++i) {
    impl_->workers.emplace_back([this, i] { impl_->Work(i); });
    impl_->workers.back().detach();  // the pool lives as long as the process
  }
}

KernelThreads::~KernelThreads() = default;

KernelThreads& KernelThreads::Get() {
  static KernelThreads* pool = [] {
    int t = g_requested_threads.load();
    if (t <= 0) t = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    return new KernelThreads(t);
  }();
  return *pool;
}

void KernelThreads::SetThreads(int threads) { g_requested_threads.store(threads); }

int KernelThreads::threads() const { return impl_->threads; }

void KernelThreads::ParallelFor(int64_t n, int64_t grain,
                                const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  const int64_t chunks = (n + grain - 1) / grain;
  std::unique_lock<std::mutex> region(impl_->region, std::try_to_lock);
  if (chunks == 1 || impl_->threads == 1 || !region.owns_lock()) {
    for (int64_t b = 0; b < n; b += grain) fn(b, std::min(n, b + grain));
    return;
  }
  const int helpers = static_cast<int>(std::min<int64_t>(impl_->threads - 1, chunks - 1));
  {
    std::lock_guard<std::mutex> l(impl_->mu);
    impl_->fn = &fn;
    impl_->n = n;
    impl_->grain = grain;
    impl_->next.store(0);
    impl_->wanted = helpers;
    impl_->active = helpers;
    ++impl_->generation;
  }
  impl_->wake.notify_all();
  impl_->RunChunks();
  std::unique_lock<std::mutex> l(impl_->mu);
  impl_->done.wait(l, [&] { return impl_->active == 0; });
}

}  // namespace moemesh::cpu
