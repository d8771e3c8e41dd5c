// bench_bandwidth: how fast this machine streams weights, the bound on CPU decode.
//
//   bench_bandwidth [--json out.json]
//
// Decode reads every active weight once per token, so tokens/s ≈ bandwidth / active bytes.
// Measures OpenBLAS sgemv over a 32000 × 1024 F32 matrix (the benchmark model's LM head), a
// plain two-thread AVX2 read of the same bytes with independent accumulators, and the decode
// kernel (cpu::MatMul with one row, on the process's kernel threads) over the same matrix in
// F32 and in BF16, and over 24 copies of one expert's gate projection (2816 × 1024, F32) taken
// in turn, so that every call streams from memory.
#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "nlohmann/json.hpp"
#include "services/compute/cpu/kernel_threads.h"
#include "services/compute/cpu/matmul.h"
#include "services/tensor/tensor.h"
#include "tools/bench/streaming.h"

ABSL_FLAG(std::string, json, "", "write results as JSON here");

namespace {

using moemesh::bench::KernelGbps;
using moemesh::bench::ReadAvx2;

double Seconds(std::chrono::steady_clock::time_point t0) {
  return moemesh::bench::SecondsSince(t0);
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const int64_t n = 32000, k = 1024, reps = 10;
  const double bytes = static_cast<double>(n) * k * 4 * reps;
  std::vector<float> w(static_cast<size_t>(n * k), 0.001f), x(k, 1.0f), y(n);
  double best_gemv = 0, best_read = 0;
  for (int r = 0; r < 3; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < reps; ++i) {
      cblas_sgemv(CblasRowMajor, CblasNoTrans, n, k, 1.0f, w.data(), k, x.data(), 1, 0.0f, y.data(),
                  1);
    }
    best_gemv = std::max(best_gemv, bytes / Seconds(t0) / 1e9);
    t0 = std::chrono::steady_clock::now();
    float sink[2] = {0, 0};
    auto work = [&](int t) {
      const int64_t half = n * k / 2;
      for (int it = 0; it < reps; ++it) sink[t] += ReadAvx2(w.data() + t * half, half);
    };
    std::thread t1(work, 0), t2(work, 1);
    t1.join();
    t2.join();
    best_read = std::max(best_read, bytes / Seconds(t0) / 1e9);
    if (sink[0] + sink[1] == -1.0f) std::printf(" ");
  }
  const double kernel_f32 = KernelGbps(moemesh::DType::kF32, n, k, 1, reps);
  const double kernel_bf16 = KernelGbps(moemesh::DType::kBF16, n, k, 1, reps);
  // 24 copies of an expert's gate (277 MB): every call streams from memory.
  const double kernel_expert = KernelGbps(moemesh::DType::kF32, 2816, 1024, 24, 240);
  const int threads = moemesh::cpu::KernelThreads::Get().threads();
  std::printf("| measurement | GB/s |\n|---|---|\n");
  std::printf("| OpenBLAS sgemv 32000x1024 F32 | %.1f |\n", best_gemv);
  std::printf("| 2-thread AVX2 read, same bytes | %.1f |\n", best_read);
  std::printf("| cpu::MatMul, 1 row, same matrix, F32 (%d threads) | %.1f |\n", threads,
              kernel_f32);
  std::printf("| cpu::MatMul, 1 row, same matrix in BF16 (%d threads) | %.1f |\n", threads,
              kernel_bf16);
  std::printf("| cpu::MatMul, 1 row, 2816 x 1024 F32 experts in turn (%d threads) | %.1f |\n",
              threads, kernel_expert);
  if (!absl::GetFlag(FLAGS_json).empty()) {
    nlohmann::json j = {{"sgemv_gb_per_s", best_gemv},
                        {"read_gb_per_s", best_read},
                        {"kernel_f32_gb_per_s", kernel_f32},
                        {"kernel_bf16_gb_per_s", kernel_bf16},
                        {"kernel_expert_f32_gb_per_s", kernel_expert}};
    std::ofstream(absl::GetFlag(FLAGS_json)) << j.dump(2) << "\n";
  }
  return 0;
}
