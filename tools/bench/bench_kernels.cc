// bench_kernels: what this CPU's cores can do, and how close the few-row kernels come to it.
//
//   bench_kernels [--threads 0] [--json out.json]
//
// Prints, per core and for the process's kernel threads:
//   1. the FMA peak: 12 independent 256-bit fused multiply-add chains, nothing loaded;
//   2. the register tile's loop on data that stays in L1 (x rows × weight rows as in
//      services/compute/cpu/matmul_tile.inc: one 8-float load per x row and per weight row, one
//      FMA per pair), for several tile shapes — what the loads + FMAs of a tile cost here;
//   3. cpu::MatMul on the benchmark model's expert shapes (gate/up 1024 → 2816, down 2816 →
//      1024) at 16, 128 and 512 rows, with one thread and with the kernel threads;
//   4. OpenBLAS sgemm on the same shapes and thread counts (not batch-invariant; the yardstick).
// Parts 1 and 2 need AVX2 + FMA and are skipped without them.
#include <cblas.h>
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "nlohmann/json.hpp"
#include "services/compute/cpu/kernel_threads.h"
#include "services/compute/cpu/matmul.h"

ABSL_FLAG(int, threads, 0, "kernel threads for the multi-threaded rows (0: all CPUs)");
ABSL_FLAG(std::string, json, "", "write results as JSON here");

namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// 1. GFLOP/s of 12 independent FMA chains (latency 4-5 cycles, 2 per cycle: 12 keep both
// pipes full). Best of 3.
__attribute__((target("avx2,fma"), noinline)) double FmaPeak() {
  double best = 0;
  for (int rep = 0; rep < 3; ++rep) {
    // Named accumulators, not an array: GCC keeps an array of vectors in memory here.
    __m256 a0 = _mm256_set1_ps(0.0f), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0,
           a8 = a0, a9 = a0, a10 = a0, a11 = a0;
    const __m256 x = _mm256_set1_ps(0.999999f), y = _mm256_set1_ps(1e-7f);
    const int64_t n = 50'000'000;
    const auto t0 = Clock::now();
    for (int64_t it = 0; it < n; ++it) {
      a0 = _mm256_fmadd_ps(a0, x, y);
      a1 = _mm256_fmadd_ps(a1, x, y);
      a2 = _mm256_fmadd_ps(a2, x, y);
      a3 = _mm256_fmadd_ps(a3, x, y);
      a4 = _mm256_fmadd_ps(a4, x, y);
      a5 = _mm256_fmadd_ps(a5, x, y);
      a6 = _mm256_fmadd_ps(a6, x, y);
      a7 = _mm256_fmadd_ps(a7, x, y);
      a8 = _mm256_fmadd_ps(a8, x, y);
      a9 = _mm256_fmadd_ps(a9, x, y);
      a10 = _mm256_fmadd_ps(a10, x, y);
      a11 = _mm256_fmadd_ps(a11, x, y);
    }
    const double s = Seconds(t0);
    const __m256 sum =
        _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)),
                                    _mm256_add_ps(_mm256_add_ps(a4, a5), _mm256_add_ps(a6, a7))),
                      _mm256_add_ps(_mm256_add_ps(a8, a9), _mm256_add_ps(a10, a11)));
    if (sum[0] == 12345.0f) std::printf(" ");  // keeps the chains alive
    best = std::max(best, n * 12.0 * 16 / s / 1e9);
  }
  return best;
}

// 2. An R × J tile's loop over k columns of L1-resident rows (row stride ld floats).
template <int R, int J>
__attribute__((target("avx2,fma"), noinline)) void TileLoop(const float* x, const float* w,
                                                            int64_t k, int64_t ld, float* out) {
  __m256 a[R][J];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) a[r][j] = _mm256_setzero_ps();
  for (int64_t c = 0; c < k; c += 8) {
    __m256 wv[J];
#pragma GCC unroll 16
    for (int j = 0; j < J; ++j) wv[j] = _mm256_loadu_ps(w + j * ld + c);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      __m256 xv = _mm256_loadu_ps(x + r * ld + c);
      __asm__("" : "+x"(xv));  // one load per x slice, as in the kernel
#pragma GCC unroll 16
      for (int j = 0; j < J; ++j) a[r][j] = _mm256_fmadd_ps(xv, wv[j], a[r][j]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) out[r * J + j] = a[r][j][0];
}

template <int R, int J>
double TileGflops() {
  const int64_t k = 512, ld = k + 16;  // 2 KB rows: the tile's rows stay in L1
  std::vector<float> x(8 * ld, 0.001f), w(8 * ld, 0.002f), out(64);
  double best = 0;
  for (int rep = 0; rep < 3; ++rep) {
    const int64_t calls = 200'000;
    const auto t0 = Clock::now();
    for (int64_t i = 0; i < calls; ++i) TileLoop<R, J>(x.data(), w.data(), k, ld, out.data());
    best = std::max(best, calls * 2.0 * R * J * k / Seconds(t0) / 1e9);
  }
  return best;
}

struct Shape {
  const char* name;
  int64_t m, k, n;
};

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  using namespace moemesh;
  const int threads =
      absl::GetFlag(FLAGS_threads) > 0 ? absl::GetFlag(FLAGS_threads) : cpu::DefaultKernelThreads();
  // The pool takes its size at first use and never grows: create it at the largest size.
  cpu::KernelThreads::SetThreads(threads);
  cpu::KernelThreads::Get();
  nlohmann::json j;
  j["threads"] = threads;
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2) {
    const double peak = FmaPeak();
    std::printf("FMA peak, one core: %.1f GFLOP/s\n\n", peak);
    j["fma_peak_gflops_per_core"] = peak;
    std::printf(
        "| tile (x rows x weight rows), L1-resident | loads per FMA | GFLOP/s, one core |\n"
        "|---|---|---|\n");
    struct T {
      const char* name;
      int r, c;
      double (*fn)();
    };
    const T tiles[] = {{"4 x 3 (AVX2 kernel)", 4, 3, TileGflops<4, 3>},
                       {"6 x 2", 6, 2, TileGflops<6, 2>},
                       {"2 x 4", 2, 4, TileGflops<2, 4>},
                       {"2 x 2", 2, 2, TileGflops<2, 2>},
                       {"1 x 8 (one-row kernel)", 1, 8, TileGflops<1, 8>}};
    for (const T& t : tiles) {
      const double g = t.fn();
      std::printf("| %s | %.2f | %.1f |\n", t.name, (t.r + t.c) / static_cast<double>(t.r * t.c),
                  g);
      j["tiles"].push_back({{"tile", t.name}, {"gflops_per_core", g}});
    }
    std::printf("\n");
  } else {
    std::printf("no AVX2 + FMA: FMA peak and tile loops skipped\n\n");
  }

  const Shape shapes[] = {{"gate/up", 16, 1024, 2816},  {"down", 16, 2816, 1024},
                          {"gate/up", 128, 1024, 2816}, {"down", 128, 2816, 1024},
                          {"gate/up", 512, 1024, 2816}, {"down", 512, 2816, 1024}};
  std::printf(
      "| product | rows m | k | n | threads | cpu::MatMul GFLOP/s | OpenBLAS sgemm GFLOP/s |\n"
      "|---|---|---|---|---|---|---|\n");
  for (const int t : {1, threads}) {
    cpu::KernelThreads::SetThreads(t);
    openblas_set_num_threads(t);
    for (const Shape& s : shapes) {
      std::vector<float> x(s.m * s.k), w(s.n * s.k), y(s.m * s.n);
      for (size_t i = 0; i < x.size(); ++i) x[i] = 0.001f * static_cast<float>(i % 97);
      for (size_t i = 0; i < w.size(); ++i) w[i] = 0.001f * static_cast<float>(i % 89);
      Weight wt;
      wt.rows = s.n;
      wt.cols = s.k;
      wt.data = w.data();
      const double flops = 2.0 * s.m * s.k * s.n;
      double ours = 0, blas = 0;
      for (int rep = 0; rep < 8; ++rep) {
        auto t0 = Clock::now();
        cpu::MatMul(x.data(), s.m, wt, y.data());
        ours = std::max(ours, flops / Seconds(t0) / 1e9);
        t0 = Clock::now();
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, s.m, s.n, s.k, 1.0f, x.data(), s.k,
                    w.data(), s.k, 0.0f, y.data(), s.n);
        blas = std::max(blas, flops / Seconds(t0) / 1e9);
      }
      std::printf("| %s | %lld | %lld | %lld | %d | %.1f | %.1f |\n", s.name,
                  static_cast<long long>(s.m), static_cast<long long>(s.k),
                  static_cast<long long>(s.n), t, ours, blas);
      j["products"].push_back({{"product", s.name},
                               {"m", s.m},
                               {"k", s.k},
                               {"n", s.n},
                               {"threads", t},
                               {"matmul_gflops", ours},
                               {"sgemm_gflops", blas}});
    }
    if (threads == 1) break;
  }
  if (!absl::GetFlag(FLAGS_json).empty()) std::ofstream(absl::GetFlag(FLAGS_json)) << j.dump(2);
  return 0;
}
