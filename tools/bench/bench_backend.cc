// bench_backend: the expert worker's compute, ExpertFfn, on each compute backend.
//
//   bench_backend [--backends cpu,cuda] [--device 0] [--shapes 1024x2816,4096x14336]
//                 [--batches 1,16,128,512] [--repeats 10] [--json out.json]
//
// For each expert shape (hidden x intermediate) and batch size it times the call a worker
// makes per expert, host buffers in and out (so a GPU backend's copies count), and checks the
// output against the CPU backend (max abs diff). "first_ms" is the first call on a backend,
// which for CUDA includes uploading the expert's weights; "ms" is the median of the rest.
// Prints a table and, with --json, writes the rows.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/time/clock.h"
#include "nlohmann/json.hpp"
#include "services/compute/backend.h"
#include "services/compute/cpu/kernel_threads.h"
#ifdef MOEMESH_HAVE_CUDA
#include "services/compute/cuda/cuda_backend.h"
#endif

ABSL_FLAG(std::string, backends, "cpu,cuda", "backends to time (cuda is skipped when absent)");
ABSL_FLAG(int, device, 0, "CUDA device");
ABSL_FLAG(std::string, shapes, "1024x2816,4096x14336,7168x2048",
          "expert shapes, hidden x intermediate");
ABSL_FLAG(std::string, batches, "1,16,128,512", "tokens per expert call");
ABSL_FLAG(int, repeats, 10, "timed calls per point (after the first)");
ABSL_FLAG(bool, check, true, "compare every output with the CPU backend");
ABSL_FLAG(std::string, json, "", "write results as JSON here");
ABSL_FLAG(int, threads, 0, "CPU kernel threads (0: all cores)");

namespace {

std::vector<float> Random(size_t n, uint64_t seed, float scale) {
  std::vector<float> v(n);
  uint64_t s = seed * 0x9e3779b97f4a7c15ull + 1;
  for (float& x : v) {
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    x = static_cast<float>((2.0 * static_cast<double>(z >> 11) * 0x1.0p-53 - 1.0) * scale);
  }
  return v;
}

bool ParseInts(absl::string_view spec, char sep, std::vector<int64_t>* out) {
  for (absl::string_view p : absl::StrSplit(spec, sep, absl::SkipWhitespace())) {
    int64_t v;
    if (!absl::SimpleAtoi(p, &v) || v <= 0) return false;
    out->push_back(v);
  }
  return !out->empty();
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  if (absl::GetFlag(FLAGS_threads) > 0)
    moemesh::cpu::KernelThreads::SetThreads(absl::GetFlag(FLAGS_threads));
  using namespace moemesh;
  struct Backend {
    std::string label;
    std::unique_ptr<ComputeBackend> be;
  };
  std::vector<Backend> backends;
  for (absl::string_view b :
       absl::StrSplit(absl::GetFlag(FLAGS_backends), ',', absl::SkipWhitespace())) {
    if (b == "cpu") {
      backends.push_back({"cpu", MakeCpuBackend()});
    } else if (b == "cuda") {
#ifdef MOEMESH_HAVE_CUDA
      const int dev = absl::GetFlag(FLAGS_device);
      auto be = MakeCudaBackend(dev);
      if (!be.ok()) {
        std::fprintf(stderr, "bench_backend: skipping cuda: %s\n", be.status().ToString().c_str());
        continue;
      }
      backends.push_back(
          {"cuda:" + std::to_string(dev) + " " + CudaDeviceName(dev), *std::move(be)});
#else
      std::fprintf(stderr, "bench_backend: skipping cuda: built without CUDA\n");
#endif
    } else {
      std::fprintf(stderr, "bench_backend: unknown backend '%s'\n", std::string(b).c_str());
      return 2;
    }
  }
  std::vector<int64_t> batches;
  if (!ParseInts(absl::GetFlag(FLAGS_batches), ',', &batches)) {
    std::fprintf(stderr, "bench_backend: bad --batches\n");
    return 2;
  }
  std::vector<std::pair<int64_t, int64_t>> shapes;
  for (absl::string_view s :
       absl::StrSplit(absl::GetFlag(FLAGS_shapes), ',', absl::SkipWhitespace())) {
    std::vector<int64_t> hi;
    if (!ParseInts(s, 'x', &hi) || hi.size() != 2) {
      std::fprintf(stderr, "bench_backend: bad shape '%s' (want HIDDENxINTER)\n",
                   std::string(s).c_str());
      return 2;
    }
    shapes.push_back({hi[0], hi[1]});
  }
  const int repeats = std::max(1, absl::GetFlag(FLAGS_repeats));
  const bool check = absl::GetFlag(FLAGS_check);
  auto cpu = MakeCpuBackend();

  nlohmann::json rows = nlohmann::json::array();
  std::printf("%-24s %7s %7s %5s %10s %10s %10s %12s\n", "backend", "hidden", "inter", "m",
              "first_ms", "ms", "GFLOP/s", "max_abs_diff");
  uint64_t seed = 1;
  for (const auto& shape : shapes) {
    const int64_t hidden = shape.first, inter = shape.second;
    // One expert's weights, alive for every backend's calls (backends may cache them).
    const std::vector<float> w1 = Random(inter * hidden, seed++, 1.0f / std::sqrt(float(hidden)));
    const std::vector<float> w3 = Random(inter * hidden, seed++, 1.0f / std::sqrt(float(hidden)));
    const std::vector<float> w2 = Random(hidden * inter, seed++, 1.0f / std::sqrt(float(inter)));
    for (int64_t m : batches) {
      const std::vector<float> x = Random(m * hidden, seed++, 1.0f);
      std::vector<float> work(2 * m * inter), want(m * hidden), y(m * hidden);
      if (check) {
        cpu->ExpertFfn(x.data(), m, hidden, inter, w1.data(), w3.data(), w2.data(), work.data(),
                       want.data());
      }
      for (Backend& b : backends) {
        auto call = [&] {
          const absl::Time t0 = absl::Now();
          b.be->ExpertFfn(x.data(), m, hidden, inter, w1.data(), w3.data(), w2.data(), work.data(),
                          y.data());
          return absl::ToDoubleMilliseconds(absl::Now() - t0);
        };
        const double first = call();
        std::vector<double> times;
        for (int r = 0; r < repeats; ++r) times.push_back(call());
        std::sort(times.begin(), times.end());
        const double ms = times[times.size() / 2];
        const double gflops = 6.0 * m * hidden * inter / (ms * 1e6);
        double diff = 0;
        if (check) {
          for (size_t i = 0; i < y.size(); ++i) {
            const double d = std::fabs(double(y[i]) - want[i]);
            diff = std::isnan(d) ? INFINITY : std::max(diff, d);
          }
        }
        std::printf("%-24s %7lld %7lld %5lld %10.3f %10.3f %10.1f %12.3g\n", b.label.c_str(),
                    static_cast<long long>(hidden), static_cast<long long>(inter),
                    static_cast<long long>(m), first, ms, gflops, diff);
        std::fflush(stdout);
        rows.push_back({{"backend", b.label},
                        {"hidden", hidden},
                        {"inter", inter},
                        {"m", m},
                        {"first_ms", first},
                        {"ms", ms},
                        {"gflops", gflops},
                        {"max_abs_diff", check ? nlohmann::json(diff) : nlohmann::json()}});
      }
    }
  }
  if (const std::string path = absl::GetFlag(FLAGS_json); !path.empty()) {
    std::ofstream(path) << nlohmann::json{{"bench", "backend_expert_ffn"}, {"rows", rows}}.dump(2)
                        << "\n";
  }
  return 0;
}
