#include "services/compute/cpu/matmul.h"

#include <cblas.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

#include "services/compute/cpu/kernel_threads.h"
#include "services/compute/cpu/matmul_internal.h"

namespace moemesh::cpu {
namespace {

using internal::kLanes;

Isa Detect() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2") &&
      __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    return Isa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c")) {
    return Isa::kAvx2;
  }
  return Isa::kScalar;
}

std::atomic<int> g_isa{-1};
std::atomic<int64_t> g_blas_min_rows{0};

internal::RowsFn RowsFor(const Weight& w) {
  // The vector decoders take one FP8 scale per 8 (AVX2) or 16 (AVX-512) columns.
  const bool fp8_ok = w.dtype != DType::kF8E4M3 || w.block_cols % 16 == 0;
  switch (ActiveIsa()) {
    case Isa::kAvx512:
      if (fp8_ok) return internal::RowsAvx512;
      break;
    case Isa::kAvx2:
      if (fp8_ok) return internal::RowsAvx2;
      break;
    case Isa::kScalar:
      break;
  }
  return internal::RowsScalar;
}

// Output columns per chunk of a parallel region: enough chunks for every thread to get
// several, each a whole number of weight panels (the kernels tile within a chunk).
int64_t Grain(int64_t n) {
  const int64_t threads = KernelThreads::Get().threads();
  const int64_t g = n / (threads * 4);
  return std::max<int64_t>(internal::kPanelRows, g / internal::kPanelRows * internal::kPanelRows);
}

// The scratch a chunk needs for a panel of dequantised weight rows.
std::vector<float>& Scratch(int64_t cols) {
  thread_local std::vector<float> buf;
  const int64_t need = internal::kPanelRows * cols + kLanes;
  if (static_cast<int64_t>(buf.size()) < need) buf.resize(need);
  return buf;
}

void BlasMatMul(const float* x, int64_t m, const Weight& w, float* y, bool accumulate) {
  const int64_t n = w.rows, k = w.cols;
  if (w.dtype == DType::kF32) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, k, 1.0f, x, k, w.f32(), k,
                accumulate ? 1.0f : 0.0f, y, n);
    return;
  }
  // Dequantise panels of weight rows and multiply each with sgemm into its columns of y.
  constexpr int64_t kPanel = 256;
  std::vector<float> panel(std::min(kPanel, n) * k);
  for (int64_t j = 0; j < n; j += kPanel) {
    const int64_t rows = std::min(kPanel, n - j);
    DequantizeRows(w, j, j + rows, panel.data());
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, rows, k, 1.0f, x, k, panel.data(), k,
                accumulate ? 1.0f : 0.0f, y + j, n);
  }
}

}  // namespace

const char* IsaName(Isa isa) {
  switch (isa) {
    case Isa::kScalar:
      return "scalar";
    case Isa::kAvx2:
      return "avx2";
    case Isa::kAvx512:
      return "avx512";
  }
  return "?";
}

Isa DetectedIsa() {
  static const Isa isa = Detect();
  return isa;
}

Isa ActiveIsa() {
  const int v = g_isa.load(std::memory_order_relaxed);
  return v < 0 ? DetectedIsa() : static_cast<Isa>(v);
}

Isa SetIsa(Isa isa) {
  const Isa set = static_cast<int>(isa) > static_cast<int>(DetectedIsa()) ? DetectedIsa() : isa;
  g_isa.store(static_cast<int>(set));
  return set;
}

void set_blas_min_rows(int64_t rows) { g_blas_min_rows.store(rows); }
int64_t blas_min_rows() { return g_blas_min_rows.load(); }

namespace internal {

// Plain loops in the canonical order; std::fma so that every step rounds exactly as the
// vector FMAs do (the build does not contract a*b+c on its own: -std=c++20 implies
// -ffp-contract=off).
void RowsScalar(const float* x, int64_t m, const Weight& w, int64_t n0, int64_t n1, float* y,
                int64_t ldy, bool accumulate, float* scratch) {
  const int64_t k = w.cols;
  for (int64_t j = n0; j < n1; ++j) {
    const float* wr;
    if (w.dtype == DType::kF32) {
      wr = w.f32() + j * k;
    } else {
      DequantizeRows(w, j, j + 1, scratch);
      wr = scratch;
    }
    for (int64_t i = 0; i < m; ++i) {
      const float* xr = x + i * k;
      float lanes[kLanes] = {};
      for (int64_t c0 = 0; c0 < k; c0 += kLanes) {
        for (int l = 0; l < kLanes; ++l) {
          const int64_t c = c0 + l;
          const float a = c < k ? xr[c] : 0.0f, b = c < k ? wr[c] : 0.0f;
          lanes[l] = std::fma(a, b, lanes[l]);
        }
      }
      const float s = ReduceLanes(lanes);
      float& d = y[i * ldy + j];
      d = accumulate ? d + s : s;
    }
  }
}

}  // namespace internal

float Dot(const float* a, const float* b, int64_t n) {
  if (ActiveIsa() != Isa::kScalar) return internal::DotAvx2(a, b, n);
  float lanes[kLanes] = {};
  for (int64_t c0 = 0; c0 < n; c0 += kLanes) {
    for (int l = 0; l < kLanes; ++l) {  // the last chunk zero-padded, as the vector kernels do
      const int64_t c = c0 + l;
      lanes[l] = std::fma(c < n ? a[c] : 0.0f, c < n ? b[c] : 0.0f, lanes[l]);
    }
  }
  return internal::ReduceLanes(lanes);
}

void Axpy(float alpha, const float* x, float* y, int64_t n) {
  if (ActiveIsa() != Isa::kScalar) return internal::AxpyAvx2(alpha, x, y, n);
  for (int64_t i = 0; i < n; ++i) y[i] = std::fma(alpha, x[i], y[i]);
}

void DotRows(const float* q, const float* k, int64_t k_stride, int64_t rows, int64_t n, float scale,
             float* out) {
  if (ActiveIsa() != Isa::kScalar)
    return internal::DotRowsMultiAvx2(q, 0, 1, k, k_stride, rows, n, scale, out, rows);
  for (int64_t j = 0; j < rows; ++j) out[j] = Dot(q, k + j * k_stride, n) * scale;
}

void AxpyRows(const float* p, float scale, const float* v, int64_t v_stride, int64_t rows,
              int64_t n, float* y) {
  if (ActiveIsa() != Isa::kScalar)
    return internal::AxpyRowsMultiAvx2(p, rows, &scale, &rows, 1, v, v_stride, n, y, n);
  for (int64_t j = 0; j < rows; ++j) Axpy(p[j] * scale, v + j * v_stride, y, n);
}

void DotRowsMulti(const float* q, int64_t q_stride, int64_t nq, const float* k, int64_t k_stride,
                  int64_t rows, int64_t n, float scale, float* out, int64_t ld) {
  if (ActiveIsa() != Isa::kScalar)
    return internal::DotRowsMultiAvx2(q, q_stride, nq, k, k_stride, rows, n, scale, out, ld);
  for (int64_t r = 0; r < nq; ++r)
    DotRows(q + r * q_stride, k, k_stride, rows, n, scale, out + r * ld);
}

void AxpyRowsMulti(const float* p, int64_t ld, const float* scales, const int64_t* rows, int64_t nq,
                   const float* v, int64_t v_stride, int64_t n, float* y, int64_t y_stride) {
  if (ActiveIsa() != Isa::kScalar) {
    return internal::AxpyRowsMultiAvx2(p, ld, scales, rows, nq, v, v_stride, n, y, y_stride);
  }
  for (int64_t r = 0; r < nq; ++r) {
    AxpyRows(p + r * ld, scales[r], v, v_stride, rows[r], n, y + r * y_stride);
  }
}

float Exp(float x) {
  using namespace internal;
  if (x != x) return x;
  if (x > kExpMax) return INFINITY;
  if (x < kExpMin) return 0.0f;
  // The operations of Exp8 (matmul_avx2.cc), one lane.
  const float n = std::nearbyint(x * kLog2e);
  const float r = std::fma(n, -kLn2Lo, std::fma(n, -kLn2Hi, x));
  float p = kExpPoly[0];
  for (int i = 1; i < 6; ++i) p = std::fma(p, r, kExpPoly[i]);
  const float y = std::fma(p, r * r, r) + 1.0f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float pow2;
  std::memcpy(&pow2, &bits, 4);
  return y * pow2;
}

void SiluMul(const float* gate, const float* up, int64_t n, float* out) {
  if (ActiveIsa() != Isa::kScalar) return internal::SiluMulAvx2(gate, up, n, out);
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i];
    out[i] = g / (1.0f + Exp(-g)) * up[i];
  }
}

float ExpShiftSum(float* s, int64_t n, float shift) {
  if (ActiveIsa() != Isa::kScalar) return internal::ExpShiftSumAvx2(s, n, shift);
  float lanes[kLanes] = {};
  for (int64_t i = 0; i < n; ++i) {
    s[i] = Exp(s[i] - shift);
    lanes[i % kLanes] += s[i];
  }
  return internal::ReduceLanes(lanes);
}

void MatMulReference(const float* x, int64_t m, const Weight& w, float* y, bool accumulate) {
  std::vector<float> scratch(w.cols + kLanes);
  internal::RowsScalar(x, m, w, 0, w.rows, y, w.rows, accumulate, scratch.data());
}

void MatMul(const float* x, int64_t m, const Weight& w, float* y, bool accumulate) {
  const int64_t n = w.rows;
  if (m <= 0 || n <= 0) return;
  const int64_t blas_rows = blas_min_rows();
  if (blas_rows > 0 && m >= blas_rows) {
    BlasMatMul(x, m, w, y, accumulate);
    return;
  }
  const internal::RowsFn rows = RowsFor(w);
  KernelThreads::Get().ParallelFor(n, Grain(n), [&](int64_t b, int64_t e) {
    rows(x, m, w, b, e, y, n, accumulate, Scratch(w.cols).data());
  });
}

void GateUpSilu(const float* x, int64_t m, const Weight& w1, const Weight& w3, float* h) {
  const int64_t inter = w1.rows;
  if (m <= 0 || inter <= 0) return;
  const int64_t blas_rows = blas_min_rows();
  if (blas_rows > 0 && m >= blas_rows) {
    std::vector<float> u(m * inter);
    BlasMatMul(x, m, w1, h, false);
    BlasMatMul(x, m, w3, u.data(), false);
    SiluMul(h, u.data(), m * inter, h);
    return;
  }
  const internal::RowsFn rows1 = RowsFor(w1), rows3 = RowsFor(w3);
  KernelThreads::Get().ParallelFor(inter, Grain(inter), [&](int64_t b, int64_t e) {
    // Gate and up of the same output columns, one chunk of weight rows at a time, then
    // SiLU·mul while the chunk is still in cache.
    const int64_t cols = e - b;
    thread_local std::vector<float> up;
    if (static_cast<int64_t>(up.size()) < m * cols) up.resize(m * cols);
    float* scratch = Scratch(std::max(w1.cols, w3.cols)).data();
    rows1(x, m, w1, b, e, h, inter, false, scratch);
    // rows writes y[i * ldy + j] for j in [b, e); shift so that column b lands at up[0].
    rows3(x, m, w3, b, e, up.data() - b, cols, false, scratch);
    for (int64_t i = 0; i < m; ++i) {
      float* hr = h + i * inter + b;
      SiluMul(hr, up.data() + i * cols, cols, hr);
    }
  });
}

void ExpertFfn(const float* x, int64_t m, const Weight& w1, const Weight& w3, const Weight& w2,
               float* workspace, float* y) {
  GateUpSilu(x, m, w1, w3, workspace);
  MatMul(workspace, m, w2, y, false);
}

}  // namespace moemesh::cpu
