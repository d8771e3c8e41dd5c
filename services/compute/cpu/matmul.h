// Few-row matrix × matrix kernels over weights in their own dtype, with run-time dispatch.
//
//   cpu::MatMul(x, m, w, y);            // y[m, n] = x[m, k] · wᵀ, w: [n, k] F32/BF16/F16/FP8
//   cpu::GateUpSilu(x, m, w1, w3, h);   // h = silu(x · w1ᵀ) * (x · w3ᵀ), one pass over x
//
// Each weight row is read from memory once per call and used for every row of x (decode
// batches have 1–32 rows; one sgemv per row would read the weights m times). BF16, F16 and
// FP8+block-scale rows are dequantised into a small per-thread F32 buffer one row at a time,
// never as a whole matrix. Output rows are split over the process's kernel threads
// (kernel_threads.h).
//
// Batch invariance, by construction: every output element y[i, j] is the same sequence of
// floating-point operations whatever m, i, the tiling or the thread split: 8 partial sums,
// lane l accumulating x[i, c] · w[j, c] for c ≡ l (mod 8) in increasing c with fused
// multiply-adds (the last chunk zero-padded), then the fixed tree
// ((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7)) shown in ReduceLanes. The scalar, AVX2 and
// AVX-512 kernels all follow it, so they give bitwise identical results and a request's
// outputs never depend on its neighbours. The one exception is opt-in: with
// set_blas_min_rows(r > 0), calls with m >= r go to OpenBLAS sgemm (faster for long prefill
// chunks, but its rounding differs from the kernels').
//
// Thread safety: MatMul and GateUpSilu may be called from any number of threads. SetIsa and
// set_blas_min_rows are for process start-up, tests and benchmarks; they must not race with
// running kernels.
#pragma once

#include <cstdint>

#include "services/tensor/weight.h"

namespace moemesh::cpu {

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

const char* IsaName(Isa isa);
// The best level this CPU and OS support (AVX2 needs FMA and F16C too).
Isa DetectedIsa();
// The level kernels use now: DetectedIsa() unless lowered by SetIsa.
Isa ActiveIsa();
// Uses `isa`, capped at DetectedIsa(); returns the level set.
Isa SetIsa(Isa isa);

// Calls with at least this many rows and F32 activations go to OpenBLAS sgemm (weights other
// than F32 are dequantised in panels of rows first). 0 (the default) never does, which keeps
// every result batch-invariant.
void set_blas_min_rows(int64_t rows);
int64_t blas_min_rows();

// y[m, n] = x[m, k] · w[n, k]ᵀ, plus y when `accumulate`.
// x: [m, k] f32 (row stride k); w: [n, k] any dtype; y: [m, n] f32 (row stride n).
void MatMul(const float* x, int64_t m, const Weight& w, float* y, bool accumulate = false);

// h[m, inter] = silu(x · w1ᵀ) * (x · w3ᵀ).
// x: [m, hidden] f32; w1, w3: [inter, hidden] (same dtype or not); h: [m, inter] f32.
void GateUpSilu(const float* x, int64_t m, const Weight& w1, const Weight& w3, float* h);

// The SiLU-gated FFN y[m, hidden] = w2 · (silu(w1 x) * w3 x).
// x: [m, hidden] f32; w1, w3: [inter, hidden]; w2: [hidden, inter]; y: [m, hidden] f32;
// workspace: m * inter floats.
void ExpertFfn(const float* x, int64_t m, const Weight& w1, const Weight& w3, const Weight& w2,
               float* workspace, float* y);

// dot(a, b) over n floats in the canonical order above (8 lanes of fused multiply-adds, then
// the fixed tree), at every instruction-set level.
float Dot(const float* a, const float* b, int64_t n);
// y[i] = fma(alpha, x[i], y[i]) for i < n, at every level.
void Axpy(float alpha, const float* x, float* y, int64_t n);

// Attention's inner loops, batched over key / value rows. Each result is bitwise what the
// one-row calls give (the batching only keeps several rows' operations in flight at once and
// y in registers), so a query row's output does not depend on which of these is used.
//
// out[j] = Dot(q, k + j * k_stride, n) * scale for j < rows.
void DotRows(const float* q, const float* k, int64_t k_stride, int64_t rows, int64_t n, float scale,
             float* out);
// For j = 0, 1, ..., rows - 1 in turn: Axpy(p[j] * scale, v + j * v_stride, y, n).
void AxpyRows(const float* p, float scale, const float* v, int64_t v_stride, int64_t rows,
              int64_t n, float* y);

// Several query rows against the same key rows: out[r * ld + j] = Dot(q + r * q_stride, k +
// j * k_stride, n) * scale for r < nq, j < rows; each result bitwise DotRows' (the batching
// loads each key slice once for all query rows).
void DotRowsMulti(const float* q, int64_t q_stride, int64_t nq, const float* k, int64_t k_stride,
                  int64_t rows, int64_t n, float scale, float* out, int64_t ld);
// For r < nq: AxpyRows(p + r * ld, scales[r], v, v_stride, rows[r], n, y + r * y_stride), each
// bitwise that call (rows[r] may differ per query row; each value slice is loaded once for all
// the rows that use it).
void AxpyRowsMulti(const float* p, int64_t ld, const float* scales, const int64_t* rows, int64_t nq,
                   const float* v, int64_t v_stride, int64_t n, float* y, int64_t y_stride);

// e^x, bitwise the same at every instruction-set level: Cephes' expf range reduction and
// polynomial in a fixed sequence of fused multiply-adds (within 2 ulp of e^x, tested), 0 below
// -87.34 (where e^x is subnormal), +inf above 88.376, NaN for NaN. Not the C library's expf,
// whose vector versions (libmvec) round differently from its scalar one.
float Exp(float x);
// out[i] = SiLU(gate[i]) · up[i] = g / (1 + Exp(-g)) * up[i] with g = gate[i], for i < n (out
// may be gate or up). Elementwise, so batch-invariant whatever n.
void SiluMul(const float* gate, const float* up, int64_t n, float* out);
// s[i] = Exp(s[i] - shift) for i < n; returns their sum in the canonical order (lane l sums the
// s[i] with i ≡ l (mod 8) in increasing i, then ReduceLanes' tree): a softmax's numerators and
// denominator, the same at every level.
float ExpShiftSum(float* s, int64_t n, float shift);

// The reference the kernels are tested against: plain loops in the canonical order above,
// one output at a time, single-threaded. Same arguments as MatMul.
void MatMulReference(const float* x, int64_t m, const Weight& w, float* y, bool accumulate);

}  // namespace moemesh::cpu
