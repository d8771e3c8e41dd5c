// CPU ComputeBackend: matrix products go to the few-row kernels of matmul.h (batch-invariant,
// any weight dtype, on the process's kernel threads; OpenBLAS sgemm above
// cpu::blas_min_rows() when that is set); attention goes one (head, query row) at a time on the
// kernel threads, in an order that does not depend on the chunk; the rest are plain
// loops that the compiler vectorises. Stateless, so one instance serves every thread.

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "services/compute/backend.h"
#include "services/compute/cpu/kernel_threads.h"
#include "services/compute/cpu/matmul.h"
#include "services/compute/softmax_topk.h"

namespace moemesh {
namespace {

class CpuBackend final : public ComputeBackend {
 public:
  std::string name() const override { return "cpu"; }

  void MatMulT(const float* x, int64_t m, int64_t k, const float* w, int64_t n, float* y,
               bool accumulate) override {
    if (m == 0 || n == 0) return;
    cpu::MatMul(x, m, F32Weight(w, n, k), y, accumulate);
  }

  void MatMulW(const float* x, int64_t m, const Weight& w, float* y, bool accumulate) override {
    cpu::MatMul(x, m, w, y, accumulate);
  }

  void ExpertFfnW(const float* x, int64_t m, const Weight& w1, const Weight& w3, const Weight& w2,
                  float* workspace, float* y) override {
    cpu::ExpertFfn(x, m, w1, w3, w2, workspace, y);
  }

  void RmsNorm(const float* x, const float* weight, int64_t rows, int64_t dim, float eps,
               float* y) override {
    for (int64_t r = 0; r < rows; ++r) {
      const float* xr = x + r * dim;
      float* yr = y + r * dim;
      double ss = 0;
      for (int64_t i = 0; i < dim; ++i) ss += static_cast<double>(xr[i]) * xr[i];
      const float inv = 1.0f / std::sqrt(static_cast<float>(ss / dim) + eps);
      for (int64_t i = 0; i < dim; ++i) yr[i] = xr[i] * inv * weight[i];
    }
  }

  void Rope(float* x, int64_t tokens, int64_t heads, int64_t head_dim, int64_t stride,
            int64_t rot_dim, const int32_t* positions, const float* inv_freq, float mscale,
            bool interleaved) override {
    const int64_t half = rot_dim / 2;
    std::vector<float> cs(half), sn(half);
    for (int64_t t = 0; t < tokens; ++t) {
      for (int64_t i = 0; i < half; ++i) {
        const double angle = static_cast<double>(positions[t]) * inv_freq[i];
        cs[i] = static_cast<float>(std::cos(angle)) * mscale;
        sn[i] = static_cast<float>(std::sin(angle)) * mscale;
      }
      for (int64_t h = 0; h < heads; ++h) {
        float* v = x + t * stride + h * head_dim;
        for (int64_t i = 0; i < half; ++i) {
          const int64_t a = interleaved ? 2 * i : i;
          const int64_t b = interleaved ? 2 * i + 1 : i + half;
          const float x0 = v[a], x1 = v[b];
          v[a] = x0 * cs[i] - x1 * sn[i];
          v[b] = x1 * cs[i] + x0 * sn[i];
        }
      }
    }
  }

  void CausalAttention(const AttentionShape& s, const float* q, const float* k, const float* v,
                       float* out) override {
    // One (head, query row) at a time, each in the same order whatever the chunk it came in:
    // a prompt prefilled whole, in chunks or token by token gives bitwise the same rows (and,
    // the other kernels being batch-invariant too, the same logits). The units run on the
    // kernel threads; rows of a long prompt cost more than short ones, so chunks are small.
    const int64_t units = s.heads * s.num_new;
    const int64_t threads = cpu::KernelThreads::Get().threads();
    const int64_t grain = std::max<int64_t>(1, units / (threads * 8));
    cpu::KernelThreads::Get().ParallelFor(units, grain, [&](int64_t b, int64_t e) {
      thread_local std::vector<float> scores;
      if (static_cast<int64_t>(scores.size()) < s.ctx) scores.resize(s.ctx);
      for (int64_t u = b; u < e; ++u) {
        AttendRow(s, u / s.num_new, u % s.num_new, q, k, v, scores.data(), out);
      }
    });
  }

 private:
  // Query row i (of the num_new new rows) of head h; `scores` holds ctx floats.
  static void AttendRow(const AttentionShape& s, int64_t h, int64_t i, const float* q,
                        const float* k, const float* v, float* scores, float* out) {
    const int64_t group = s.heads / s.kv_heads;
    const int64_t g = h / group;
    const float* qh = q + i * s.q_stride + h * s.qk_dim;
    const float* kg = k + g * s.qk_dim;
    const float* vg = v + g * s.v_dim;
    float* oh = out + i * s.heads * s.v_dim + h * s.v_dim;
    const int64_t visible = s.ctx - s.num_new + i + 1;
    cpu::DotRows(qh, kg, s.k_stride, visible, s.qk_dim, s.scale, scores);
    float mx = -INFINITY;
    for (int64_t j = 0; j < visible; ++j) mx = std::max(mx, scores[j]);
    float sum = 0;
    for (int64_t j = 0; j < visible; ++j) {
      scores[j] = std::exp(scores[j] - mx);
      sum += scores[j];
    }
    const float inv = 1.0f / sum;
    for (int64_t d = 0; d < s.v_dim; ++d) oh[d] = 0.0f;
    cpu::AxpyRows(scores, inv, vg, s.v_stride, visible, s.v_dim, oh);
  }

 public:
  void SiluMul(const float* gate, const float* up, int64_t n, float* out) override {
    for (int64_t i = 0; i < n; ++i) {
      const float g = gate[i];
      out[i] = g / (1.0f + std::exp(-g)) * up[i];
    }
  }

  void ExpertFfn(const float* x, int64_t m, int64_t hidden, int64_t inter, const float* w1,
                 const float* w3, const float* w2, float* workspace, float* y) override {
    cpu::ExpertFfn(x, m, F32Weight(w1, inter, hidden), F32Weight(w3, inter, hidden),
                   F32Weight(w2, hidden, inter), workspace, y);
  }

  void SoftmaxTopK(const float* logits, int64_t t, int64_t e, int k, bool renormalize, int32_t* ids,
                   float* weights) override {
    SoftmaxTopKHost(logits, t, e, k, renormalize, ids, weights);
  }
};

}  // namespace

std::unique_ptr<ComputeBackend> MakeCpuBackend() { return std::make_unique<CpuBackend>(); }

}  // namespace moemesh
