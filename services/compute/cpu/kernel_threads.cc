#include "services/compute/cpu/kernel_threads.h"

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <fstream>
#include <mutex>
#include <sstream>
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
  // The current region: its generation (bumped per region) << 16 | the workers taking part.
  // One word, so that a worker reads both at once: read apart, a worker could pair one region's
  // generation with the next region's count, take part in that region twice and leave a later
  // region's count short of zero forever (seen as a deadlock with 16 threads).
  std::atomic<uint64_t> state{0};
  static constexpr int kWantedBits = 16;
  static constexpr uint64_t kWantedMask = (uint64_t{1} << kWantedBits) - 1;
  const std::function<void(int64_t, int64_t)>* fn = nullptr;
  int64_t n = 0, grain = 1;
  std::atomic<int64_t> next{0};
  std::atomic<int> active{0};  // workers still inside the current region

  void RunChunks() {
    for (;;) {
      const int64_t b = next.fetch_add(grain, std::memory_order_relaxed);
      if (b >= n) return;
      (*fn)(b, std::min(n, b + grain));
    }
  }

  // A worker takes part in a region only if the region's own count includes it; the caller
  // cannot start another region before every counted worker has left this one, so fn, n, grain
  // and next are this region's while it runs its chunks.
  void Work(int index) {
    uint64_t seen = 0;  // the last generation handled
    for (;;) {
      uint64_t now = 0;
      auto changed = [&] {
        now = state.load(std::memory_order_acquire);
        return (now >> kWantedBits) != seen;
      };
      if (!SpinUntil(changed)) {
        std::unique_lock<std::mutex> l(mu);
        wake.wait(l, changed);
      }
      seen = now >> kWantedBits;
      if (static_cast<uint64_t>(index) >= (now & kWantedMask)) continue;
      RunChunks();
      if (active.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        std::lock_guard<std::mutex> l(mu);
        done.notify_one();
      }
    }
  }
};

KernelThreads::KernelThreads(int threads) : impl_(new Impl) {
  // Helpers are counted in 16 bits (Impl::state).
  impl_->threads = std::clamp(threads, 1, static_cast<int>(Impl::kWantedMask) + 1);
  for (int i = 0; i + 1 < impl_->threads; ++i) {
    std::thread([this, i] { impl_->Work(i); }).detach();  // the pool lives as long as the process
  }
}

KernelThreads::~KernelThreads() = default;

namespace internal {

int CpuLimitFromCfs(int64_t quota_us, int64_t period_us) {
  if (quota_us <= 0 || period_us <= 0) return 0;
  const int64_t n = (quota_us + period_us - 1) / period_us;
  return static_cast<int>(std::min<int64_t>(n, 1 << 20));
}

int CpuLimitFromCpuMax(const std::string& cpu_max) {
  std::istringstream in(cpu_max);
  std::string quota;
  int64_t period = 0;
  if (!(in >> quota >> period) || quota == "max") return 0;
  int64_t q = 0;
  for (const char c : quota) {
    if (c < '0' || c > '9' || q > (int64_t{1} << 50)) return 0;
    q = q * 10 + (c - '0');
  }
  return CpuLimitFromCfs(q, period);
}

}  // namespace internal

namespace {

std::string ReadSmallFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return "";
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

// The smaller of two limits where 0 means none.
int TighterLimit(int a, int b) { return a > 0 && (b <= 0 || a < b) ? a : b; }

// The limit of `dir` (a cgroup directory) and of each of its ancestors up to `root`, the
// smallest that is set; 0 if none is.
template <typename ReadLimit>
int SmallestLimitUpTo(const std::string& root, std::string rel, ReadLimit read) {
  int best = 0;
  for (;;) {
    best = TighterLimit(read(root + rel), best);
    if (rel.empty() || rel == "/") break;
    const size_t slash = rel.rfind('/');
    rel = slash == std::string::npos || slash == 0 ? "" : rel.substr(0, slash);
  }
  return best;
}

}  // namespace

int CgroupCpuLimit() {
  // /proc/self/cgroup: "0::/path" (v2) and "N:controllers:/path" lines (v1). Inside a container
  // with a cgroup namespace the path is "/" and the limit sits on the mount's root.
  std::istringstream lines(ReadSmallFile("/proc/self/cgroup"));
  std::string line;
  int best = 0;
  auto take = [&best](int n) { best = TighterLimit(n, best); };
  while (std::getline(lines, line)) {
    const size_t a = line.find(':'), b = a == std::string::npos ? a : line.find(':', a + 1);
    if (b == std::string::npos) continue;
    const std::string controllers = line.substr(a + 1, b - a - 1);
    std::string rel = line.substr(b + 1);
    if (rel == "/") rel = "";
    if (controllers.empty()) {
      take(SmallestLimitUpTo("/sys/fs/cgroup", rel, [](const std::string& dir) {
        return internal::CpuLimitFromCpuMax(ReadSmallFile(dir + "/cpu.max"));
      }));
      continue;
    }
    bool cpu = false;
    std::istringstream names(controllers);
    std::string name;
    while (std::getline(names, name, ',')) cpu = cpu || name == "cpu";
    if (!cpu) continue;
    for (const std::string root : {"/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct"}) {
      take(SmallestLimitUpTo(root, rel, [](const std::string& dir) {
        const std::string q = ReadSmallFile(dir + "/cpu.cfs_quota_us");
        const std::string p = ReadSmallFile(dir + "/cpu.cfs_period_us");
        if (q.empty() || p.empty()) return 0;
        return internal::CpuLimitFromCfs(std::atoll(q.c_str()), std::atoll(p.c_str()));
      }));
    }
  }
  return best;
}

int DefaultKernelThreads() {
  // The CPUs this process may run on (taskset, a container's cpuset), not the machine's: more
  // threads than that would only take turns on the same cores inside every parallel region.
  // Likewise a CPU quota (a Kubernetes limit without a cpuset): threads beyond it are throttled
  // together, and a parallel region waits for its slowest thread.
  int n = 0;
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) n = CPU_COUNT(&set);
  if (n <= 0) n = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  return TighterLimit(CgroupCpuLimit(), n);
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
  p.next.store(0, std::memory_order_relaxed);
  p.active.store(helpers, std::memory_order_relaxed);
  {
    // Under mu, so that a worker about to sleep either sees the new generation or is woken.
    std::lock_guard<std::mutex> l(p.mu);
    const uint64_t generation = (p.state.load(std::memory_order_relaxed) >> Impl::kWantedBits) + 1;
    p.state.store(generation << Impl::kWantedBits | static_cast<uint64_t>(helpers),
                  std::memory_order_release);
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
