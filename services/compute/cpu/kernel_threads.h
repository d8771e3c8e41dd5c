// KernelThreads: the process's one persistent pool of compute threads for CPU kernels.
//
//   cpu::KernelThreads::Get().ParallelFor(n, grain, [&](int64_t begin, int64_t end) { ... });
//
// ParallelFor splits [0, n) into chunks of `grain` and runs them on the pool's threads plus
// the caller, returning when all are done. One parallel region runs at a time: a call made
// while another is running (from a second request thread, or nested inside a chunk) runs its
// chunks inline on its own thread, so the process never has more busy compute threads than
// cores and never deadlocks. OpenBLAS keeps its own threads; the kernels never call BLAS from
// inside a region, so the two pools are never busy at once within one call.
//
// Thread-safe. The pool starts on first use with DefaultKernelThreads() threads (caller
// included) unless SetThreads ran before.
#pragma once

#include <cstdint>
#include <functional>

namespace moemesh::cpu {

// The number of CPUs in this process's affinity mask (taskset, a container's cpuset), else
// hardware_concurrency().
int DefaultKernelThreads();

class KernelThreads {
 public:
  static KernelThreads& Get();
  // Threads a region uses, the caller included. Before the pool's first use it sets the pool's
  // size; after, it takes effect for regions started after it returns, up to that size (the
  // pool never grows: a benchmark that compares sizes sets the largest first).
  static void SetThreads(int threads);
  // Threads a region uses now: the pool's size, or less if SetThreads asked for less since.
  int threads() const;

  void ParallelFor(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

  KernelThreads(const KernelThreads&) = delete;
  KernelThreads& operator=(const KernelThreads&) = delete;

 private:
  struct Impl;
  explicit KernelThreads(int threads);
  ~KernelThreads();
  Impl* impl_;
};

}  // namespace moemesh::cpu
