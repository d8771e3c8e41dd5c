// CPU ComputeBackend: matrix products go to the few-row kernels of matmul.h (batch-invariant,
// any weight dtype, on the process's kernel threads; OpenBLAS sgemm above
// cpu::blas_min_rows() when that is set); attention batches the query rows that read the same
// keys on the kernel threads, each row in an order that does not depend on the chunk or the
// batch; SiLU and softmax use cpu::Exp (the same bits at every instruction-set level); the rest
// are plain loops. Stateless, so one instance serves every thread.

#include <algorithm>
#include <cmath>
#include <numeric>
#include <utility>
#include <vector>

#include "services/compute/backend.h"
#include "services/compute/cpu/kernel_threads.h"
#include "services/compute/cpu/matmul.h"
#include "services/compute/softmax_topk.h"

namespace moemesh {
namespace {

// dst[i] = the F32 value of the BF16 bits src[i]: a shift, vectorised (-O2 alone left it scalar;
// the build has -fopenmp-simd).
void Bf16RowToF32(const uint16_t* __restrict src, int64_t n, float* __restrict dst) {
  uint32_t* out = reinterpret_cast<uint32_t*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<uint32_t>(src[i]) << 16;
}

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

  bool SupportsSegmentedCache() const override { return true; }

  void CausalAttention(const AttentionShape& s, const float* q, const float* k, const float* v,
                       float* out) override {
    // Each (head, query row) is computed in the same order whatever the chunk it came in and
    // whatever rows it is batched with: a prompt prefilled whole, in chunks or token by token
    // gives bitwise the same rows (and, the other kernels being batch-invariant too, the same
    // logits). A unit batches the query rows that read the same keys: the heads of one
    // key/value group at one position (grouped-query attention), or, without groups, up to
    // kRowBlock consecutive positions of one head; the kernels load each key and value slice
    // once for all of them. Units run on the kernel threads; rows of a long prompt cost more than
    // short ones, so chunks are small.
    const int64_t group = s.heads / s.kv_heads;
    const int64_t blocks = group > 1 ? s.num_new : (s.num_new + kRowBlock - 1) / kRowBlock;
    const int64_t units = s.kv_heads * blocks;
    const int64_t threads = cpu::KernelThreads::Get().threads();
    const int64_t grain = std::max<int64_t>(1, units / (threads * 8));
    cpu::KernelThreads::Get().ParallelFor(units, grain, [&](int64_t b, int64_t e) {
      thread_local std::vector<float> scores;
      const int64_t rows = std::max(group, kRowBlock);
      if (static_cast<int64_t>(scores.size()) < rows * s.ctx) scores.resize(rows * s.ctx);
      for (int64_t u = b; u < e; ++u)
        AttendUnit(s, u / blocks, u % blocks, q, k, v, scores.data(), out);
    });
  }

 private:
  static constexpr int64_t kRowBlock = 4;

  // Unit `block` of key/value group g; `scores` holds rows × ctx floats.
  static void AttendUnit(const AttentionShape& s, int64_t g, int64_t block, const float* q,
                         const float* k, const float* v, float* scores, float* out) {
    const int64_t group = s.heads / s.kv_heads;
    const int64_t out_row = s.heads * s.v_dim;
    // Query rows r < nq of the unit: q at q0 + r * qs, output at y0 + r * ys, seeing the first
    // vis[r] keys.
    int64_t nq, qs, ys, i0;
    const float* q0;
    float* y0;
    if (group > 1) {
      i0 = block;
      nq = group;
      q0 = q + i0 * s.q_stride + g * group * s.qk_dim;
      qs = s.qk_dim;
      y0 = out + i0 * out_row + g * group * s.v_dim;
      ys = s.v_dim;
    } else {
      i0 = block * kRowBlock;
      nq = std::min(kRowBlock, s.num_new - i0);
      q0 = q + i0 * s.q_stride + g * s.qk_dim;
      qs = s.q_stride;
      y0 = out + i0 * out_row + g * s.v_dim;
      ys = out_row;
    }
    thread_local std::vector<int64_t> vis, used;
    thread_local std::vector<float> inv;
    vis.resize(nq);
    used.resize(nq);
    inv.resize(nq);
    int64_t most = 0;
    for (int64_t r = 0; r < nq; ++r) {
      vis[r] = s.ctx - s.num_new + i0 + (group > 1 ? 0 : r) + 1;
      most = std::max(most, vis[r]);
    }
    // Cache rows in segments: the whole cache at once, or a paged cache block by block. Each
    // score is its own dot product and each output element the same FMAs in increasing key
    // order whatever the segments (the accumulators go through y between them), so both give
    // the same bits.
    // A BF16 segment's rows of this group are converted (exactly) into a small F32 copy first;
    // the kernels' arithmetic does not depend on the rows' stride, so the bits are the same.
    const int64_t seg = s.segment_rows > 0 ? s.segment_rows : s.ctx;
    const bool bf16 = s.segment_rows > 0 && s.segment_dtype == DType::kBF16;
    thread_local std::vector<float> converted;
    // Rows [j0, j0 + n) of key/value group g at `offset` past each row's start (0 for k,
    // v_offset for v), `width` floats each: a pointer and the stride between its rows.
    auto rows_at = [&](int64_t j0, int64_t n, int64_t offset, int64_t stride, int64_t width,
                       const float* whole) -> std::pair<const float*, int64_t> {
      if (s.segment_rows == 0) return {whole + j0 * stride + g * width, stride};
      const int64_t at = offset + g * width;
      if (!bf16) return {static_cast<const float*>(s.segments[j0 / seg]) + at, stride};
      if (static_cast<int64_t>(converted.size()) < n * width) converted.resize(n * width);
      const uint16_t* src = static_cast<const uint16_t*>(s.segments[j0 / seg]) + at;
      for (int64_t r = 0; r < n; ++r) Bf16RowToF32(src + r * stride, width, &converted[r * width]);
      return {converted.data(), width};
    };
    for (int64_t j0 = 0; j0 < most; j0 += seg) {
      const int64_t n = std::min(seg, most - j0);
      const auto [kr, kstride] = rows_at(j0, n, 0, s.k_stride, s.qk_dim, k);
      cpu::DotRowsMulti(q0, qs, nq, kr, kstride, n, s.qk_dim, s.scale, scores + j0, s.ctx);
    }
    for (int64_t r = 0; r < nq; ++r) {
      float* row = scores + r * s.ctx;
      float mx = -INFINITY;
      for (int64_t j = 0; j < vis[r]; ++j) mx = std::max(mx, row[j]);
      inv[r] = 1.0f / cpu::ExpShiftSum(row, vis[r], mx);
      std::fill(y0 + r * ys, y0 + r * ys + s.v_dim, 0.0f);
    }
    for (int64_t j0 = 0; j0 < most; j0 += seg) {
      for (int64_t r = 0; r < nq; ++r) used[r] = std::clamp<int64_t>(vis[r] - j0, 0, seg);
      const auto [vr, vstride] =
          rows_at(j0, std::min(seg, most - j0), s.v_offset, s.v_stride, s.v_dim, v);
      cpu::AxpyRowsMulti(scores + j0, s.ctx, inv.data(), used.data(), nq, vr, vstride, s.v_dim, y0,
                         ys);
    }
  }

 public:
  void SiluMul(const float* gate, const float* up, int64_t n, float* out) override {
    cpu::SiluMul(gate, up, n, out);
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
