#include "services/compute/cpu/kernel_threads.h"

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

namespace moemesh::cpu {
namespace {

std::atomic<int> g_requested_threads{0};

// How long an idle worker (or a caller waiting for its helpers) spins before sleeping. A decode
// step runs a few hundred short regions back to back; waking a sleeping thread costs tens of
// microseconds each time, spinning this long costs nothing when regions follow each other.
constexpr auto kSpin = std::chrono::microseconds(50);

template <typename Pred>
bool SpinUntil(Pred pred) {
  const auto end = std::chrono::steady_clock::now() + kSpin;
  for (int i = 0;; ++i) {
    if (pred()) return true;
    __builtin_ia32_pause();
    if ((i & 63) == 63 && std::chrono::steady_clock::now() > end) return false;
  }
}

}  // namespace

struct KernelThreads::Impl {
  int threads = 1;
  std::mutex region;  // held by the caller for the whole of a parallel region
  std::mutex mu;      // guards sleeping and waking only
  std::condition_variable wake, done;
  std::atomic<uint64_t> generation{0};  // bumped per region
  const std::function<void(int64_t, int64_t)>* fn = nullptr;
  int64_t n = 0, grain = 1;
  int wanted = 0;  // workers taking part in the current region
  std::atomic<int64_t> next{0};
  std::atomic<int> active{0};  // workers still inside the current region

  void RunChunks() {
    for (;;) {
      const int64_t b = next.fetch_add(grain, std::memory_order_relaxed);
      if (b >= n) return;
      (*fn)(b, std::min(n, b + grain));
    }
  }

  void Work(int index) {
    uint64_t seen = 0;
    for (;;) {
      auto changed = [&] { return generation.load(std::memory_order_acquire) != seen; };
      if (!SpinUntil(changed)) {
        std::unique_lock<std::mutex> l(mu);
        wake.wait(l, changed);
      }
      seen = generation.load(std::memory_order_acquire);
      if (index >= wanted) continue;
      RunChunks();
      if (active.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        std::lock_guard<std::mutex> l(mu);
        done.notify_one();
      }
    }
  }
};

KernelThreads::KernelThreads(int threads) : impl_(new Impl) {
  impl_->threads = std::max(1, threads);
  for (int i = 0; i + 1 < impl_->threads; ++i) {
    std::thread([this, i] { impl_->Work(i); }).detach();  // the pool lives as long as the process
  }
}

KernelThreads::~KernelThreads() = default;

int DefaultKernelThreads() {
  // The CPUs this process may run on (taskset, a container's cpuset), not the machine's: more
  // threads than that would only take turns on the same cores inside every parallel region.
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    const int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
  return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}

KernelThreads& KernelThreads::Get() {
  static KernelThreads* pool = [] {
    int t = g_requested_threads.load();
    if (t <= 0) t = DefaultKernelThreads();
    return new KernelThreads(t);
  }();
  return *pool;
}

void KernelThreads::SetThreads(int threads) { g_requested_threads.store(threads); }

int KernelThreads::threads() const {
  const int requested = g_requested_threads.load(std::memory_order_relaxed);
  return requested > 0 && requested < impl_->threads ? requested : impl_->threads;
}

void KernelThreads::ParallelFor(int64_t n, int64_t grain,
                                const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  const int64_t chunks = (n + grain - 1) / grain;
  std::unique_lock<std::mutex> region(impl_->region, std::defer_lock);
  const int threads = this->threads();
  if (chunks == 1 || threads == 1 || !region.try_lock()) {
    for (int64_t b = 0; b < n; b += grain) fn(b, std::min(n, b + grain));
    return;
  }
  Impl& p = *impl_;
  const int helpers = static_cast<int>(std::min<int64_t>(threads - 1, chunks - 1));
  p.fn = &fn;
  p.n = n;
  p.grain = grain;
  p.wanted = helpers;
  p.next.store(0, std::memory_order_relaxed);
  p.active.store(helpers, std::memory_order_relaxed);
  {
    // Under mu, so that a worker about to sleep either sees the new generation or is woken.
    std::lock_guard<std::mutex> l(p.mu);
    p.generation.fetch_add(1, std::memory_order_release);
  }
  p.wake.notify_all();
  p.RunChunks();
  auto finished = [&] { return p.active.load(std::memory_order_acquire) == 0; };
  if (!SpinUntil(finished)) {
    std::unique_lock<std::mutex> l(p.mu);
    p.done.wait(l, finished);
  }
}

}  // namespace moemesh::cpu
