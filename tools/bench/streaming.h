// Streaming-bandwidth probes shared by bench_bandwidth and bench_engine (header only: each
// tools/bench/*.cc is its own binary).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <vector>

#include "services/compute/cpu/kernel_threads.h"
#include "services/compute/cpu/matmul.h"
#include "services/tensor/tensor.h"

namespace moemesh::bench {

inline double SecondsSince(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// The sum of p[0, n), read with four independent 256-bit accumulators (AVX2, chosen per
// function so that the including binary needs no -mavx2).
__attribute__((target("avx2"), noinline)) inline float ReadAvx2(const float* p, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    a0 = _mm256_add_ps(a0, _mm256_loadu_ps(p + i));
    a1 = _mm256_add_ps(a1, _mm256_loadu_ps(p + i + 8));
    a2 = _mm256_add_ps(a2, _mm256_loadu_ps(p + i + 16));
    a3 = _mm256_add_ps(a3, _mm256_loadu_ps(p + i + 24));
  }
  alignas(32) float b[8];
  _mm256_store_ps(b, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  float s = b[0] + b[1] + b[2] + b[3] + b[4] + b[5] + b[6] + b[7];
  for (; i < n; ++i) s += p[i];
  return s;
}

// The same without AVX2 (eight independent scalar sums).
inline float ReadPlain(const float* p, int64_t n) {
  float a[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int l = 0; l < 8; ++l) a[l] += p[i + l];
  }
  float s = a[0] + a[1] + a[2] + a[3] + a[4] + a[5] + a[6] + a[7];
  for (; i < n; ++i) s += p[i];
  return s;
}

// Best GB/s of three passes reading `copies` distinct buffers of `floats` each in turn, every
// buffer split over the process's kernel threads.
inline double ReadGbps(int copies, int64_t floats) {
  std::vector<std::vector<float>> bufs(copies, std::vector<float>(floats, 0.001f));
  const bool avx2 = __builtin_cpu_supports("avx2");
  std::atomic<float> sink{0};
  double best = 0;
  for (int pass = 0; pass < 3; ++pass) {
    const auto t0 = std::chrono::steady_clock::now();
    for (const std::vector<float>& buf : bufs) {
      cpu::KernelThreads::Get().ParallelFor(floats, int64_t{1} << 16, [&](int64_t b, int64_t e) {
        sink.store(avx2 ? ReadAvx2(buf.data() + b, e - b) : ReadPlain(buf.data() + b, e - b),
                   std::memory_order_relaxed);
      });
    }
    best = std::max(best,
                    static_cast<double>(copies) * floats * sizeof(float) / SecondsSince(t0) / 1e9);
  }
  return best;
}

// Best GB/s of three passes of cpu::MatMul(x, 1, w) over `copies` distinct copies of an n × k
// weight (F32 or BF16), `calls` calls each, taken in turn (so that small matrices come from
// memory, not cache, as in a decode step).
inline double KernelGbps(DType dtype, int64_t n, int64_t k, int copies, int calls) {
  const size_t esize = DTypeBytes(dtype);
  std::vector<std::vector<uint8_t>> bufs(copies, std::vector<uint8_t>(n * k * esize));
  std::vector<Weight> ws(copies);
  for (int c = 0; c < copies; ++c) {
    for (int64_t i = 0; i < n * k; ++i) {
      const float v = 0.001f * static_cast<float>((i * 7 + c) % 13);
      if (dtype == DType::kF32) {
        std::memcpy(bufs[c].data() + i * 4, &v, 4);
      } else {
        const uint16_t b = FloatToBF16(v);
        std::memcpy(bufs[c].data() + i * 2, &b, 2);
      }
    }
    ws[c].dtype = dtype;
    ws[c].rows = n;
    ws[c].cols = k;
    ws[c].data = bufs[c].data();
  }
  std::vector<float> x(k, 1.0f), y(n);
  double best = 0;
  for (int r = 0; r < 3; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < calls; ++i) cpu::MatMul(x.data(), 1, ws[i % copies], y.data());
    best = std::max(best, static_cast<double>(n) * k * esize * calls / SecondsSince(t0) / 1e9);
  }
  return best;
}

}  // namespace moemesh::bench
