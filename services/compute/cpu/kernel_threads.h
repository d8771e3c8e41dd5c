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
#include <string>

namespace moemesh::cpu {

// The number of CPUs in this process's affinity mask (taskset, a container's cpuset), else
// hardware_concurrency(); at most the CPUs its cgroup's CPU quota pays for (a Kubernetes CPU
// limit), rounded up.
int DefaultKernelThreads();

// The CPUs this process's cgroup CPU quota allows, ceil(quota / period), the smallest over the
// cgroup and its ancestors (cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`);
// 0 when there is no quota or none can be read.
int CgroupCpuLimit();

namespace internal {
// ceil(quota / period) of a cgroup v2 `cpu.max` text ("max 100000", "250000 100000"); 0 for
// "max" or text that is not a quota.
int CpuLimitFromCpuMax(const std::string& cpu_max);
// ceil(quota / period) for cgroup v1's values; 0 when quota <= 0 (-1: none) or period <= 0.
int CpuLimitFromCfs(int64_t quota_us, int64_t period_us);
}  // namespace internal

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
