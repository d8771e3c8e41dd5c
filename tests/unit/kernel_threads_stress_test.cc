// The kernel thread pool under many back-to-back regions of varying width, with more threads
// than CPUs (as on a 16-core machine, where a lost or doubled count once deadlocked a region:
// a worker read a region's generation and the next region's helper count separately, took part
// in the next region twice, and a later region's count never reached zero). Its own binary:
// the pool's size is fixed at first use, and this test wants 16 threads on any machine.
#include <sched.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <future>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "services/compute/cpu/kernel_threads.h"

namespace moemesh::cpu {
namespace {

TEST(KernelThreadsStressTest, VaryingRegionsNeverLoseACountOrAnIndex) {
  KernelThreads::SetThreads(16);  // before the pool's first use: it gets 16 threads
  KernelThreads& pool = KernelThreads::Get();
  ASSERT_EQ(pool.threads(), 16);
  std::atomic<bool> ok{true};
  // Widths that need 1, 2, 3, 15 and all helpers, alternating, so the helper count changes
  // from one region to the next (the race needs a region narrower than the one before).
  const int64_t widths[] = {2, 40, 3, 16, 1, 100, 4};
  auto work = std::async(std::launch::async, [&] {
    std::vector<std::atomic<int>> hits(100);
    for (int r = 0; r < 30000 && ok; ++r) {
      const int64_t n = widths[r % 7];
      for (int64_t i = 0; i < n; ++i) hits[i].store(0, std::memory_order_relaxed);
      pool.ParallelFor(n, 1, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) hits[i].fetch_add(1, std::memory_order_relaxed);
      });
      for (int64_t i = 0; i < n; ++i) {
        if (hits[i].load(std::memory_order_relaxed) != 1) ok = false;
      }
    }
  });
  // A deadlocked region never returns: fail (and stop the process) instead of hanging.
  if (work.wait_for(std::chrono::seconds(120)) != std::future_status::ready) {
    std::fprintf(stderr, "a parallel region did not finish in 120 s: the pool deadlocked\n");
    std::fflush(stderr);
    std::_Exit(1);
  }
  EXPECT_TRUE(ok) << "an index ran zero times or twice in a region";
}

}  // namespace
}  // namespace moemesh::cpu
