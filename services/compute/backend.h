// ComputeBackend: the numerical kernels every moemesh process runs, behind one interface.
//
// The CPU backend (services/compute/cpu) runs its own few-row kernels (matmul.h) over weights in
// their checkpoint dtype, and OpenBLAS where asked; a CUDA backend lives in
// services/compute/cuda and is built only when nvcc is found. All pointers are host memory;
// activations are row-major F32. Weights use Hugging Face's [out_features, in_features] layout,
// as F32 pointers or as Weight (any dtype, services/tensor/weight.h). The caller
// owns every buffer. A backend instance may be shared by threads only if its implementation
// says so; the CPU backend is stateless and thread-safe.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "services/tensor/weight.h"

namespace moemesh {

struct AttentionShape {
  int64_t num_new = 0;   // query rows (new tokens), at positions ctx-num_new .. ctx-1
  int64_t ctx = 0;       // keys/values in the cache, including the new ones
  int64_t heads = 0;     // query heads
  int64_t kv_heads = 0;  // key/value heads; heads % kv_heads == 0 (grouped-query attention)
  int64_t qk_dim = 0;    // per-head query/key width
  int64_t v_dim = 0;     // per-head value width
  int64_t q_stride = 0;  // floats between query rows (>= heads * qk_dim)
  int64_t k_stride = 0;  // floats between cache rows of k
  int64_t v_stride = 0;  // floats between cache rows of v
  float scale = 1.0f;    // softmax scale, usually qk_dim^-0.5
  // A paged cache read in place: when segment_rows > 0, cache row j of k is at
  // segments[j / segment_rows] + (j % segment_rows) * k_stride, and of v at the same segment +
  // v_offset + (j % segment_rows) * v_stride, elements of segment_dtype (F32, or BF16 whose
  // values are used exactly, as F32); CausalAttention's k and v arguments are unused. Only for a
  // backend whose SupportsSegmentedCache() is true.
  int64_t segment_rows = 0;
  const void* const* segments = nullptr;
  DType segment_dtype = DType::kF32;
  int64_t v_offset = 0;
};

class ComputeBackend {
 public:
  virtual ~ComputeBackend() = default;
  virtual std::string name() const = 0;

  // y[m, n] = x[m, k] · w[n, k]ᵀ (+ y[m, n] when accumulate).
  virtual void MatMulT(const float* x, int64_t m, int64_t k, const float* w, int64_t n, float* y,
                       bool accumulate = false) = 0;

  // y[m, n] = x[m, k] · wᵀ (+ y when accumulate), w: [n, k] Weight of any dtype.
  // x: [m, k] f32; y: [m, n] f32. The default dequantises non-F32 weights on every call (a
  // correct fallback for backends without native low-precision kernels).
  virtual void MatMulW(const float* x, int64_t m, const Weight& w, float* y,
                       bool accumulate = false) {
    if (w.dtype == DType::kF32) {
      MatMulT(x, m, w.cols, w.f32(), w.rows, y, accumulate);
      return;
    }
    std::vector<float> f(w.rows * w.cols);
    DequantizeRows(w, 0, w.rows, f.data());
    MatMulT(x, m, w.cols, f.data(), w.rows, y, accumulate);
  }

  // ExpertFfn over Weights: x: [m, hidden] f32; w1, w3: [inter, hidden]; w2: [hidden, inter];
  // y: [m, hidden] f32; workspace: 2 * m * inter floats. Default: F32 weights go to ExpertFfn,
  // others are dequantised per call.
  virtual void ExpertFfnW(const float* x, int64_t m, const Weight& w1, const Weight& w3,
                          const Weight& w2, float* workspace, float* y) {
    const int64_t hidden = w1.cols, inter = w1.rows;
    if (w1.dtype == DType::kF32 && w3.dtype == DType::kF32 && w2.dtype == DType::kF32) {
      ExpertFfn(x, m, hidden, inter, w1.f32(), w3.f32(), w2.f32(), workspace, y);
      return;
    }
    float* g = workspace;
    float* u = workspace + m * inter;
    MatMulW(x, m, w1, g);
    MatMulW(x, m, w3, u);
    SiluMul(g, u, m * inter, g);
    MatMulW(g, m, w2, y);
  }

  // y[r, :] = x[r, :] / sqrt(mean(x[r, :]²) + eps) * weight. y may alias x.
  virtual void RmsNorm(const float* x, const float* weight, int64_t rows, int64_t dim, float eps,
                       float* y) = 0;

  // Rotary embedding, in place, on x[tokens, heads, head_dim] (row stride `stride` floats,
  // heads packed at head_dim apart, rotating the first `rot_dim` dims of each head).
  // HF rotate_half (interleaved=false): pairs (i, i + rot_dim/2); DeepSeek (interleaved=true):
  // adjacent pairs (2i, 2i+1). inv_freq[rot_dim/2] holds the frequencies and `mscale`
  // multiplies cos and sin (1 without YaRN).
  virtual void Rope(float* x, int64_t tokens, int64_t heads, int64_t head_dim, int64_t stride,
                    int64_t rot_dim, const int32_t* positions, const float* inv_freq, float mscale,
                    bool interleaved) = 0;

  // Causal attention of the new query rows over the cache: out[num_new, heads, v_dim].
  // q: [num_new, heads, qk_dim]; k: [ctx, kv_heads, qk_dim]; v: [ctx, kv_heads, v_dim].
  // Query row i sits at position ctx - num_new + i and sees cache rows 0 ..= that position.
  virtual void CausalAttention(const AttentionShape& s, const float* q, const float* k,
                               const float* v, float* out) = 0;
  // Whether CausalAttention reads AttentionShape's segments (a paged cache in place); when not,
  // callers gather the cache into one contiguous buffer first.
  virtual bool SupportsSegmentedCache() const { return false; }

  // out = silu(gate) * up, elementwise over n values. out may alias gate.
  virtual void SiluMul(const float* gate, const float* up, int64_t n, float* out) = 0;

  // The SiLU-gated FFN y[m, hidden] = w2(silu(w1 x) * w3 x) for x[m, hidden];
  // w1, w3: [inter, hidden]; w2: [hidden, inter]. `workspace` holds 2 * m * inter floats.
  virtual void ExpertFfn(const float* x, int64_t m, int64_t hidden, int64_t inter, const float* w1,
                         const float* w3, const float* w2, float* workspace, float* y) = 0;

  // Softmax top-k gating with Mixtral semantics: for each row of logits[t, e], softmax over all
  // e experts, take the k largest (ties: lower expert index first), and when `renormalize`,
  // divide the chosen weights by their sum. Writes ids[t, k] and weights[t, k] in descending
  // order of weight.
  virtual void SoftmaxTopK(const float* logits, int64_t t, int64_t e, int k, bool renormalize,
                           int32_t* ids, float* weights) = 0;
};

// The OpenBLAS backend.
std::unique_ptr<ComputeBackend> MakeCpuBackend();

}  // namespace moemesh
