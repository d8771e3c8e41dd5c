// Internal to the CPU kernels: the per-instruction-set entry points behind matmul.h.
//
// Each computes y[i * ldy + j] = dot(x[i, :], w[j, :]) (+ y when accumulate) for i < m and
// n0 <= j < n1 in the canonical order of matmul.h. `scratch` holds kPanelRows * w.cols + 16
// floats (a panel of dequantised weight rows). The AVX files are compiled with their own -m flags
// and must not include standard-library headers with inline code, so that no AVX instantiation of a
// shared inline function can be picked by the linker for the baseline build.
#pragma once

#include <cstdint>

#include "services/tensor/weight.h"

namespace moemesh::cpu::internal {

inline constexpr int kLanes = 8;
// Weight rows per panel: a multiple of both tile widths (3 on AVX2, 4 on AVX-512).
inline constexpr int64_t kPanelRows = 24;

using RowsFn = void (*)(const float* x, int64_t m, const Weight& w, int64_t n0, int64_t n1,
                        float* y, int64_t ldy, bool accumulate, float* scratch);

void RowsScalar(const float* x, int64_t m, const Weight& w, int64_t n0, int64_t n1, float* y,
                int64_t ldy, bool accumulate, float* scratch);
void RowsAvx2(const float* x, int64_t m, const Weight& w, int64_t n0, int64_t n1, float* y,
              int64_t ldy, bool accumulate, float* scratch);
void RowsAvx512(const float* x, int64_t m, const Weight& w, int64_t n0, int64_t n1, float* y,
                int64_t ldy, bool accumulate, float* scratch);

// The AVX-512 kernel's tile shape (32 registers: a 6 × 4 tile holds 24 accumulators, 4 weight
// slices and 1 x slice; one x row against 8 weight rows holds 8 + 8 + 1).
inline constexpr int kAvx512TileRows = 6;
inline constexpr int kAvx512TileCols = 4;
inline constexpr int kAvx512DecodeCols = 8;
// The AVX-512 kernel's tiling run with AVX2 instructions (same arithmetic: both compute in
// 256-bit vectors). Lets a machine without AVX-512 test the AVX-512 kernel's tiling logic.
void RowsAvx2WithAvx512Tiles(const float* x, int64_t m, const Weight& w, int64_t n0, int64_t n1,
                             float* y, int64_t ldy, bool accumulate, float* scratch);

// Dot and Axpy of matmul.h with AVX2 + FMA.
float DotAvx2(const float* a, const float* b, int64_t n);
void AxpyAvx2(float alpha, const float* x, float* y, int64_t n);

// Exp, SiluMul and ExpShiftSum of matmul.h with AVX2 + FMA.
void SiluMulAvx2(const float* gate, const float* up, int64_t n, float* out);
float ExpShiftSumAvx2(float* s, int64_t n, float shift);
// DotRowsMulti and AxpyRowsMulti of matmul.h with AVX2 + FMA (DotRows and AxpyRows are their
// one-query forms).
void DotRowsMultiAvx2(const float* q, int64_t q_stride, int64_t nq, const float* k,
                      int64_t k_stride, int64_t rows, int64_t n, float scale, float* out,
                      int64_t ld);
void AxpyRowsMultiAvx2(const float* p, int64_t ld, const float* scales, const int64_t* rows,
                       int64_t nq, const float* v, int64_t v_stride, int64_t n, float* y,
                       int64_t y_stride);

// Exp's constants (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, ln2 in two parts so that
// n ln2 is exact enough; e^r by a degree-7 polynomial). Exp(x) is +inf above kExpMax (where
// 2^n would need n = 128) and 0 below kExpMin (where the result would be subnormal).
inline constexpr float kExpMax = 88.3762626647949f;
inline constexpr float kExpMin = -87.3365447505531f;
inline constexpr float kLog2e = 1.44269504088896341f;
inline constexpr float kLn2Hi = 0.693359375f;
inline constexpr float kLn2Lo = -2.12194440e-4f;
inline constexpr float kExpPoly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                                      4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

// The canonical reduction of 8 partial sums: ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)).
inline float ReduceLanes(const float* l) {
  float u[4], v[2];
  for (int i = 0; i < 4; ++i) u[i] = l[i] + l[i + 4];
  for (int i = 0; i < 2; ++i) v[i] = u[i] + u[i + 2];
  return v[0] + v[1];
}

}  // namespace moemesh::cpu::internal
