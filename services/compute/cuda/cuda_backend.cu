// CUDA ComputeBackend: cuBLAS sgemm (CUBLAS_COMPUTE_32F) for the GEMMs and plain, obviously
// correct kernels for the rest. See cuda_backend.h for the contract (host pointers, the weight
// cache, thread safety, failures).
//
// Every op follows one pattern under the instance mutex: upload the activations into scratch
// buffers that only grow, look the weights up in (or add them to) the device weight cache, run
// on the instance stream, download the result and synchronise the stream before returning, so
// that no device work outlives the call and the caller's host buffers are free to reuse.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "services/compute/backend.h"
#include "services/compute/cuda/cuda_backend.h"
#include "services/compute/softmax_topk.h"

// Aborts with the failing call, where it is and CUDA's reason. Only for runtime failures of the
// device or the driver inside the void ops (see the header); never for anything a request holds.
#define MOEMESH_CUDA_CHECK(expr)                                                                   \
  do {                                                                                             \
    const cudaError_t moemesh_cuda_err_ = (expr);                                                  \
    if (moemesh_cuda_err_ != cudaSuccess) {                                                        \
      std::fprintf(stderr, "moemesh cuda backend: %s failed at %s:%d: %s (%s)\n", #expr, __FILE__, \
                   __LINE__, cudaGetErrorName(moemesh_cuda_err_),                                  \
                   cudaGetErrorString(moemesh_cuda_err_));                                         \
      std::abort();                                                                                \
    }                                                                                              \
  } while (0)

#define MOEMESH_CUBLAS_CHECK(expr)                                                            \
  do {                                                                                        \
    const cublasStatus_t moemesh_cublas_st_ = (expr);                                         \
    if (moemesh_cublas_st_ != CUBLAS_STATUS_SUCCESS) {                                        \
      std::fprintf(stderr, "moemesh cuda backend: %s failed at %s:%d: %s\n", #expr, __FILE__, \
                   __LINE__, cublasGetStatusString(moemesh_cublas_st_));                      \
      std::abort();                                                                           \
    }                                                                                         \
  } while (0)

// A kernel launch reports bad configurations through cudaGetLastError.
#define MOEMESH_CUDA_CHECK_LAUNCH() MOEMESH_CUDA_CHECK(cudaGetLastError())

namespace moemesh {
namespace {

constexpr int kThreads = 256;            // elementwise kernels and RMSNorm
constexpr int kAttnThreads = 256;        // 8 warps per (query row, head)
constexpr int kAttnTile = 64;            // keys whose probabilities are staged in shared memory
constexpr int64_t kMaxBlocks = 1 << 20;  // grid-stride loops cover the rest

int Blocks(int64_t n, int threads) {
  return static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>((n + threads - 1) / threads, kMaxBlocks)));
}

// ---- kernels ------------------------------------------------------------------------------

__device__ __forceinline__ float WarpSum(float v) {
  // Butterfly: every lane ends with the same, bitwise identical, sum (addition commutes).
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ double WarpSumD(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float WarpMax(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// x, y: [rows, dim]; weight: [dim]. One block per row. y may alias x: every element is read and
// written by the same thread, and the writes come after the block-wide reduction.
// The sum of squares is accumulated in double, as the CPU backend does.
__global__ void RmsNormKernel(const float* x, const float* __restrict__ weight, int64_t dim,
                              float eps, float* y) {
  __shared__ double partial[32];
  const int64_t r = blockIdx.x;
  const float* xr = x + r * dim;
  float* yr = y + r * dim;
  double ss = 0;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
    const double v = xr[i];
    ss += v * v;
  }
  ss = WarpSumD(ss);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  if (lane == 0) partial[warp] = ss;
  __syncthreads();
  double total = 0;
  for (int w = 0; w < nwarps; ++w) total += partial[w];
  const float inv = 1.0f / sqrtf(static_cast<float>(total / dim) + eps);
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) yr[i] = xr[i] * inv * weight[i];
}

// x: [tokens, row_stride] on the device, head h of a token at h * head_dim; rotates the first
// 2 * half dims of each head. One thread per (token, head, pair). cos and sin are taken in
// double from a double angle, as the CPU backend does, then rounded and scaled by mscale.
__global__ void RopeKernel(float* x, int64_t tokens, int64_t heads, int64_t head_dim,
                           int64_t row_stride, int64_t half, const int32_t* __restrict__ positions,
                           const float* __restrict__ inv_freq, float mscale, bool interleaved) {
  const int64_t total = tokens * heads * half;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = idx % half;
    const int64_t th = idx / half;
    const int64_t h = th % heads;
    const int64_t t = th / heads;
    const double angle = static_cast<double>(positions[t]) * inv_freq[i];
    double s, c;
    sincos(angle, &s, &c);
    const float cs = static_cast<float>(c) * mscale;
    const float sn = static_cast<float>(s) * mscale;
    float* v = x + t * row_stride + h * head_dim;
    const int64_t a = interleaved ? 2 * i : i;
    const int64_t b = interleaved ? 2 * i + 1 : i + half;
    const float x0 = v[a], x1 = v[b];
    v[a] = x0 * cs - x1 * sn;
    v[b] = x1 * cs + x0 * sn;
  }
}

// out[i] = silu(gate[i]) * up[i]; out may alias gate (same index read then written).
__global__ void SiluMulKernel(const float* gate, const float* __restrict__ up, int64_t n,
                              float* out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float g = gate[i];
    out[i] = g / (1.0f + expf(-g)) * up[i];
  }
}

// q · k for one key, by one warp; every lane gets the same value (see WarpSum).
__device__ __forceinline__ float WarpDot(const float* qs, const float* __restrict__ kr, int64_t dim,
                                         int lane) {
  float s = 0;
  for (int64_t d = lane; d < dim; d += 32) s += qs[d] * kr[d];
  return WarpSum(s);
}

// Causal attention, one block per (query row i, head h): blockIdx.x = i * heads + h.
// q: [num_new, heads * qk_dim] rows q_stride apart; k: [ctx, kv_heads * qk_dim] rows k_stride
// apart; v: [ctx, kv_heads * v_dim] rows v_stride apart; out: [num_new, heads * v_dim] dense.
// Row i sits at position ctx - num_new + i and sees keys 0 ..= that position. Two passes over
// the visible keys: the first finds the largest score, the second recomputes each score (bit
// for bit the same), takes exp(score - max) and accumulates the weighted values, tile by tile.
// Dynamic shared memory: (qk_dim + v_dim + kAttnTile + 32) floats.
__global__ void __launch_bounds__(kAttnThreads)
    AttentionKernel(const float* __restrict__ q, const float* __restrict__ k,
                    const float* __restrict__ v, float* __restrict__ out, int64_t num_new,
                    int64_t ctx, int64_t heads, int64_t kv_heads, int64_t qk_dim, int64_t v_dim,
                    int64_t q_stride, int64_t k_stride, int64_t v_stride, float scale) {
  extern __shared__ float smem[];
  float* qs = smem;            // [qk_dim] this row's query
  float* acc = qs + qk_dim;    // [v_dim] unnormalised output
  float* p = acc + v_dim;      // [kAttnTile] exp(score - max) of the current tile
  float* red = p + kAttnTile;  // [32] cross-warp reduction

  const int64_t i = blockIdx.x / heads;
  const int64_t h = blockIdx.x % heads;
  const int64_t g = h / (heads / kv_heads);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
  const float* qrow = q + i * q_stride + h * qk_dim;
  const float* kg = k + g * qk_dim;
  const float* vg = v + g * v_dim;
  float* orow = out + (i * heads + h) * v_dim;

  for (int64_t d = tid; d < qk_dim; d += blockDim.x) qs[d] = qrow[d];
  for (int64_t d = tid; d < v_dim; d += blockDim.x) acc[d] = 0.0f;
  __syncthreads();

  const int64_t visible = ctx - num_new + i + 1;
  if (visible <= 0) {  // only when ctx < num_new, which the interface rules out
    for (int64_t d = tid; d < v_dim; d += blockDim.x) orow[d] = 0.0f;
    return;
  }

  float mx = -INFINITY;
  for (int64_t j = warp; j < visible; j += nwarps) {
    mx = fmaxf(mx, scale * WarpDot(qs, kg + j * k_stride, qk_dim, lane));
  }
  mx = WarpMax(mx);
  if (lane == 0) red[warp] = mx;
  __syncthreads();
  mx = -INFINITY;
  for (int w = 0; w < nwarps; ++w) mx = fmaxf(mx, red[w]);
  __syncthreads();  // red is written again below

  float sum = 0.0f;  // kept by thread 0
  for (int64_t t0 = 0; t0 < visible; t0 += kAttnTile) {
    const int64_t n = min(static_cast<int64_t>(kAttnTile), visible - t0);
    for (int64_t jj = warp; jj < n; jj += nwarps) {
      const float s = scale * WarpDot(qs, kg + (t0 + jj) * k_stride, qk_dim, lane);
      if (lane == 0) p[jj] = expf(s - mx);
    }
    __syncthreads();
    for (int64_t d = tid; d < v_dim; d += blockDim.x) {
      const float* vd = vg + t0 * v_stride + d;
      float a = acc[d];
      for (int64_t jj = 0; jj < n; ++jj) a += p[jj] * vd[jj * v_stride];
      acc[d] = a;
    }
    if (tid == 0) {
      for (int64_t jj = 0; jj < n; ++jj) sum += p[jj];
    }
    __syncthreads();  // p is overwritten by the next tile
  }
  if (tid == 0) red[0] = sum;
  __syncthreads();
  const float inv = 1.0f / red[0];
  for (int64_t d = tid; d < v_dim; d += blockDim.x) orow[d] = acc[d] * inv;
}

// ---- host side ----------------------------------------------------------------------------

absl::Status CudaError(cudaError_t e, const std::string& what) {
  return absl::InternalError(what + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) +
                             ")");
}

// A fingerprint of up to 16 floats spread evenly over a weight, first and last included.
uint64_t Fingerprint(const float* host, size_t count) {
  constexpr size_t kSamples = 16;
  uint64_t hash = 1469598103934665603ull ^ count;
  const size_t samples = std::min(count, kSamples);
  for (size_t s = 0; s < samples; ++s) {
    const size_t idx = samples == 1 ? 0 : s * (count - 1) / (samples - 1);
    uint32_t bits;
    std::memcpy(&bits, host + idx, sizeof(bits));
    hash = (hash ^ bits) * 1099511628211ull;
  }
  return hash;
}

// Device memory that only grows.
struct DeviceBuffer {
  void* ptr = nullptr;
  size_t bytes = 0;
};

class CudaBackend final : public ComputeBackend {
 public:
  CudaBackend(int device, cudaStream_t stream, cublasHandle_t cublas)
      : device_(device), stream_(stream), cublas_(cublas) {}

  ~CudaBackend() override {
    // Errors are ignored here: at process exit the runtime may already be going away.
    std::lock_guard<std::mutex> lock(mu_);
    cudaSetDevice(device_);
    cudaStreamSynchronize(stream_);
    for (DeviceBuffer* b : {&x_, &y_, &g_, &u_, &k_, &v_, &pos_, &freq_}) {
      if (b->ptr != nullptr) cudaFree(b->ptr);
    }
    for (auto& [key, dev] : weights_) {
      if (dev.ptr != nullptr) cudaFree(dev.ptr);
    }
    cublasDestroy(cublas_);
    cudaStreamDestroy(stream_);
  }

  std::string name() const override { return "cuda"; }

  void MatMulT(const float* x, int64_t m, int64_t k, const float* w, int64_t n, float* y,
               bool accumulate) override {
    if (m <= 0 || n <= 0) return;
    if (k <= 0) {  // an empty sum: y = 0, or y unchanged when accumulating
      if (!accumulate) std::memset(y, 0, static_cast<size_t>(m * n) * sizeof(float));
      return;
    }
    std::lock_guard<std::mutex> lock(mu_);
    Activate();
    float* dx = Reserve<float>(x_, m * k);
    float* dy = Reserve<float>(y_, m * n);
    const float* dw = DeviceWeight(w, n * k);
    Upload(dx, x, m * k);
    if (accumulate) Upload(dy, y, m * n);
    Gemm(dx, m, k, dw, n, dy, accumulate ? 1.0f : 0.0f);
    Download(y, dy, m * n);
    Finish();
  }

  void RmsNorm(const float* x, const float* weight, int64_t rows, int64_t dim, float eps,
               float* y) override {
    if (rows <= 0 || dim <= 0) return;
    std::lock_guard<std::mutex> lock(mu_);
    Activate();
    float* dx = Reserve<float>(x_, rows * dim);
    const float* dw = DeviceWeight(weight, dim);
    Upload(dx, x, rows * dim);
    RmsNormKernel<<<static_cast<unsigned>(rows), kThreads, 0, stream_>>>(dx, dw, dim, eps, dx);
    MOEMESH_CUDA_CHECK_LAUNCH();
    Download(y, dx, rows * dim);  // y may alias x: x was consumed by the upload
    Finish();
  }

  void Rope(float* x, int64_t tokens, int64_t heads, int64_t head_dim, int64_t stride,
            int64_t rot_dim, const int32_t* positions, const float* inv_freq, float mscale,
            bool interleaved) override {
    const int64_t half = rot_dim / 2;
    if (tokens <= 0 || heads <= 0 || half <= 0) return;
    // Only the floats the CPU backend touches move: per token, from the first head's start to
    // the end of the last head's rotated dims (the rest of the last head may lie past the
    // caller's buffer, e.g. for DeepSeek's q_pe at the tail of each head).
    const int64_t width = (heads - 1) * head_dim + 2 * half;
    std::lock_guard<std::mutex> lock(mu_);
    Activate();
    float* dx = Reserve<float>(x_, RowsFloats(tokens, width, stride));
    int32_t* dpos = Reserve<int32_t>(pos_, tokens);
    float* dfreq = Reserve<float>(freq_, half);
    const int64_t dstride = UploadRows(dx, x, tokens, width, stride);
    Upload(dpos, positions, tokens);
    Upload(dfreq, inv_freq, half);
    RopeKernel<<<Blocks(tokens * heads * half, kThreads), kThreads, 0, stream_>>>(
        dx, tokens, heads, head_dim, dstride, half, dpos, dfreq, mscale, interleaved);
    MOEMESH_CUDA_CHECK_LAUNCH();
    DownloadRows(x, dx, tokens, width, stride);
    Finish();
  }

  void CausalAttention(const AttentionShape& s, const float* q, const float* k, const float* v,
                       float* out) override {
    if (s.num_new <= 0 || s.heads <= 0 || s.kv_heads <= 0 || s.v_dim <= 0) return;
    const int64_t q_width = s.heads * s.qk_dim;
    const int64_t k_width = s.kv_heads * s.qk_dim;
    const int64_t v_width = s.kv_heads * s.v_dim;
    std::lock_guard<std::mutex> lock(mu_);
    Activate();
    float* dq = Reserve<float>(x_, RowsFloats(s.num_new, q_width, s.q_stride));
    float* dk = Reserve<float>(k_, RowsFloats(s.ctx, k_width, s.k_stride));
    float* dv = Reserve<float>(v_, RowsFloats(s.ctx, v_width, s.v_stride));
    float* dout = Reserve<float>(y_, s.num_new * s.heads * s.v_dim);
    const int64_t dq_stride = UploadRows(dq, q, s.num_new, q_width, s.q_stride);
    const int64_t dk_stride = UploadRows(dk, k, s.ctx, k_width, s.k_stride);
    const int64_t dv_stride = UploadRows(dv, v, s.ctx, v_width, s.v_stride);
    const size_t smem = static_cast<size_t>(s.qk_dim + s.v_dim + kAttnTile + 32) * sizeof(float);
    if (smem > attention_smem_) {
      // Past the default 48 KiB a kernel must opt in; beyond the device's limit this fails.
      MOEMESH_CUDA_CHECK(cudaFuncSetAttribute(
          AttentionKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
      attention_smem_ = smem;
    }
    AttentionKernel<<<static_cast<unsigned>(s.num_new * s.heads), kAttnThreads, smem, stream_>>>(
        dq, dk, dv, dout, s.num_new, s.ctx, s.heads, s.kv_heads, s.qk_dim, s.v_dim, dq_stride,
        dk_stride, dv_stride, s.scale);
    MOEMESH_CUDA_CHECK_LAUNCH();
    Download(out, dout, s.num_new * s.heads * s.v_dim);
    Finish();
  }

  void SiluMul(const float* gate, const float* up, int64_t n, float* out) override {
    if (n <= 0) return;
    std::lock_guard<std::mutex> lock(mu_);
    Activate();
    float* dg = Reserve<float>(g_, n);
    float* du = Reserve<float>(u_, n);
    Upload(dg, gate, n);
    Upload(du, up, n);
    SiluMulKernel<<<Blocks(n, kThreads), kThreads, 0, stream_>>>(dg, du, n, dg);
    MOEMESH_CUDA_CHECK_LAUNCH();
    Download(out, dg, n);
    Finish();
  }

  // The intermediate [m, inter] never leaves the device; `workspace` is not needed.
  void ExpertFfn(const float* x, int64_t m, int64_t hidden, int64_t inter, const float* w1,
                 const float* w3, const float* w2, float* workspace, float* y) override {
    if (m <= 0 || hidden <= 0) return;
    if (inter <= 0) {
      std::memset(y, 0, static_cast<size_t>(m * hidden) * sizeof(float));
      return;
    }
    std::lock_guard<std::mutex> lock(mu_);
    Activate();
    float* dx = Reserve<float>(x_, m * hidden);
    float* dy = Reserve<float>(y_, m * hidden);
    float* dg = Reserve<float>(g_, m * inter);
    float* du = Reserve<float>(u_, m * inter);
    const float* dw1 = DeviceWeight(w1, inter * hidden);
    const float* dw3 = DeviceWeight(w3, inter * hidden);
    const float* dw2 = DeviceWeight(w2, hidden * inter);
    Upload(dx, x, m * hidden);
    Gemm(dx, m, hidden, dw1, inter, dg, 0.0f);
    Gemm(dx, m, hidden, dw3, inter, du, 0.0f);
    SiluMulKernel<<<Blocks(m * inter, kThreads), kThreads, 0, stream_>>>(dg, du, m * inter, dg);
    MOEMESH_CUDA_CHECK_LAUNCH();
    Gemm(dg, m, inter, dw2, hidden, dy, 0.0f);
    Download(y, dy, m * hidden);
    Finish();
  }

  // On the host: the logits are host memory already, [t, e] is small, and this way the
  // tie-breaking is the CPU backend's exactly (the same code, the same libm).
  void SoftmaxTopK(const float* logits, int64_t t, int64_t e, int k, bool renormalize, int32_t* ids,
                   float* weights) override {
    SoftmaxTopKHost(logits, t, e, k, renormalize, ids, weights);
  }

 private:
  // The calling thread may have another device current (or none yet).
  void Activate() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { MOEMESH_CUDA_CHECK(cudaSetDevice(device_)); }

  // Waits for this call's work, so nothing outlives it.
  void Finish() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    MOEMESH_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }

  template <typename T>
  T* Reserve(DeviceBuffer& b, int64_t count) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    const size_t need = static_cast<size_t>(std::max<int64_t>(count, 1)) * sizeof(T);
    if (need > b.bytes) {
      // No call's work is in flight (each ends synchronised), and cudaFree synchronises anyway.
      // Growing by half again keeps the number of reallocations logarithmic in the peak size.
      const size_t cap = std::max(need, b.bytes + b.bytes / 2);
      if (b.ptr != nullptr) MOEMESH_CUDA_CHECK(cudaFree(b.ptr));
      b.ptr = nullptr;
      b.bytes = 0;
      MOEMESH_CUDA_CHECK(cudaMalloc(&b.ptr, cap));
      b.bytes = cap;
    }
    return static_cast<T*>(b.ptr);
  }

  template <typename T>
  void Upload(T* dev, const T* host, int64_t count) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    MOEMESH_CUDA_CHECK(cudaMemcpyAsync(dev, host, static_cast<size_t>(count) * sizeof(T),
                                       cudaMemcpyHostToDevice, stream_));
  }

  template <typename T>
  void Download(T* host, const T* dev, int64_t count) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    MOEMESH_CUDA_CHECK(cudaMemcpyAsync(host, dev, static_cast<size_t>(count) * sizeof(T),
                                       cudaMemcpyDeviceToHost, stream_));
  }

  // Device floats that hold `rows` host rows of `width` floats, `stride` apart: packed when the
  // rows are disjoint, else the whole (overlapping) span as it is.
  static int64_t RowsFloats(int64_t rows, int64_t width, int64_t stride) {
    if (rows <= 0 || width <= 0) return 0;
    return stride >= width ? rows * width : (rows - 1) * stride + width;
  }

  // Copies those rows up; returns the row stride they have on the device.
  int64_t UploadRows(float* dev, const float* host, int64_t rows, int64_t width, int64_t stride)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (rows <= 0 || width <= 0) return width;
    if (stride >= width) {
      MOEMESH_CUDA_CHECK(cudaMemcpy2DAsync(dev, width * sizeof(float), host, stride * sizeof(float),
                                           width * sizeof(float), rows, cudaMemcpyHostToDevice,
                                           stream_));
      return width;
    }
    Upload(dev, host, RowsFloats(rows, width, stride));
    return stride;
  }

  // The inverse of UploadRows; host floats outside the rows are not written.
  void DownloadRows(float* host, const float* dev, int64_t rows, int64_t width, int64_t stride)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (rows <= 0 || width <= 0) return;
    if (stride >= width) {
      MOEMESH_CUDA_CHECK(cudaMemcpy2DAsync(host, stride * sizeof(float), dev, width * sizeof(float),
                                           width * sizeof(float), rows, cudaMemcpyDeviceToHost,
                                           stream_));
      return;
    }
    Download(host, dev, RowsFloats(rows, width, stride));
  }

  // The device copy of an immutable host weight of `count` floats, uploaded on first use.
  const float* DeviceWeight(const float* host, int64_t count) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    const size_t bytes = static_cast<size_t>(count) * sizeof(float);
    const uint64_t fp = Fingerprint(host, static_cast<size_t>(count));
    auto [it, inserted] =
        weights_.try_emplace(std::make_pair(reinterpret_cast<uintptr_t>(host), bytes));
    CachedWeight& cw = it->second;
    if (inserted) {
      const cudaError_t e = cudaMalloc(&cw.ptr, bytes);
      if (e != cudaSuccess) {
        std::fprintf(stderr,
                     "moemesh cuda backend: cannot keep another %zu-byte weight on device %d "
                     "(%zu bytes of weights cached): %s\n",
                     bytes, device_, weight_bytes_, cudaGetErrorString(e));
        std::abort();
      }
      weight_bytes_ += bytes;
    } else if (cw.fingerprint == fp) {
      return cw.ptr;
    }
    // New, or the address now holds other data (see the header): (re)upload.
    Upload(cw.ptr, host, count);
    cw.fingerprint = fp;
    return cw.ptr;
  }

  // Row-major y[m, n] = x[m, k] · w[n, k]ᵀ + beta · y, all on the device. cuBLAS is column-major,
  // where these buffers read as xᵀ [k, m], wᵀ [k, n] and yᵀ [n, m]; so it computes
  // yᵀ = (wᵀ)ᵀ · xᵀ = op_T(wᵀ) · xᵀ. CUBLAS_COMPUTE_32F: IEEE F32 throughout, never TF32.
  void Gemm(const float* x, int64_t m, int64_t k, const float* w, int64_t n, float* y, float beta)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    const float alpha = 1.0f;
    MOEMESH_CUBLAS_CHECK(cublasGemmEx_64(cublas_, CUBLAS_OP_T, CUBLAS_OP_N, n, m, k, &alpha, w,
                                         CUDA_R_32F, k, x, CUDA_R_32F, k, &beta, y, CUDA_R_32F, n,
                                         CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  }

  struct CachedWeight {
    float* ptr = nullptr;
    uint64_t fingerprint = 0;
  };

  const int device_;
  std::mutex mu_;
  cudaStream_t stream_ ABSL_GUARDED_BY(mu_);
  cublasHandle_t cublas_ ABSL_GUARDED_BY(mu_);
  // Scratch: x_ holds the input of each op (q for attention), y_ its output; g_/u_ the FFN
  // intermediate (and SiluMul's operands); k_/v_ the attention cache; pos_/freq_ Rope's tables.
  DeviceBuffer x_ ABSL_GUARDED_BY(mu_), y_ ABSL_GUARDED_BY(mu_), g_ ABSL_GUARDED_BY(mu_),
      u_ ABSL_GUARDED_BY(mu_), k_ ABSL_GUARDED_BY(mu_), v_ ABSL_GUARDED_BY(mu_),
      pos_ ABSL_GUARDED_BY(mu_), freq_ ABSL_GUARDED_BY(mu_);
  size_t attention_smem_ ABSL_GUARDED_BY(mu_) = 48 * 1024;
  // (host address, bytes) → device copy.
  std::map<std::pair<uintptr_t, size_t>, CachedWeight> weights_ ABSL_GUARDED_BY(mu_);
  size_t weight_bytes_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace

namespace cuda_impl {

int CudaDeviceCount() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the error so that later calls start clean
    return 0;
  }
  return count;
}

std::string CudaDeviceName(int device) {
  if (device < 0 || device >= CudaDeviceCount()) return "";
  cudaDeviceProp prop;
  if (cudaGetDeviceProperties(&prop, device) != cudaSuccess) {
    cudaGetLastError();
    return "";
  }
  return prop.name;
}

absl::StatusOr<std::unique_ptr<ComputeBackend>> MakeCudaBackend(int device) {
  int count = 0;
  if (const cudaError_t e = cudaGetDeviceCount(&count); e != cudaSuccess) {
    cudaGetLastError();
    // Without a GPU driver this is cudaErrorInsufficientDriver, whose text reads as if the
    // driver were merely old; say what it usually means.
    return absl::FailedPreconditionError(std::string("no usable CUDA device (no GPU or driver?): "
                                                     "cudaGetDeviceCount: ") +
                                         cudaGetErrorName(e) + ": " + cudaGetErrorString(e));
  }
  if (count == 0) return absl::FailedPreconditionError("no CUDA device is visible");
  if (device < 0 || device >= count) {
    return absl::InvalidArgumentError("CUDA device " + std::to_string(device) +
                                      " does not exist (devices are 0.." +
                                      std::to_string(count - 1) + ")");
  }
  if (const cudaError_t e = cudaSetDevice(device); e != cudaSuccess) {
    return CudaError(e, "cudaSetDevice(" + std::to_string(device) + ")");
  }
  cudaStream_t stream = nullptr;
  if (const cudaError_t e = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
      e != cudaSuccess) {
    return CudaError(e, "cudaStreamCreate");
  }
  cublasHandle_t cublas = nullptr;
  cublasStatus_t st = cublasCreate(&cublas);
  if (st == CUBLAS_STATUS_SUCCESS) st = cublasSetStream(cublas, stream);
  // The default math mode with CUBLAS_COMPUTE_32F keeps GEMMs in IEEE F32 (no TF32); atomics
  // stay off so that results are deterministic run to run.
  if (st == CUBLAS_STATUS_SUCCESS) st = cublasSetMathMode(cublas, CUBLAS_DEFAULT_MATH);
  if (st == CUBLAS_STATUS_SUCCESS) st = cublasSetAtomicsMode(cublas, CUBLAS_ATOMICS_NOT_ALLOWED);
  if (st != CUBLAS_STATUS_SUCCESS) {
    if (cublas != nullptr) cublasDestroy(cublas);
    cudaStreamDestroy(stream);
    return absl::InternalError(std::string("cuBLAS setup failed: ") + cublasGetStatusString(st));
  }
  return std::unique_ptr<ComputeBackend>(new CudaBackend(device, stream, cublas));
}

}  // namespace cuda_impl
}  // namespace moemesh

// The C entry points that services/compute/cuda/cuda_loader.cc finds with dlsym. This file
// is built as its own shared library, loaded only when a CUDA backend is asked for: cuBLAS
// carries ~110 KB of static TLS, which, linked into every binary, made threads with small
// stacks (civetweb's, under the metrics endpoint) fail to start.
extern "C" {

int moemesh_cuda_device_count() { return moemesh::cuda_impl::CudaDeviceCount(); }

// Copies the device name into buf (NUL-terminated, truncated to len - 1 bytes).
void moemesh_cuda_device_name(int device, char* buf, int len) {
  const std::string name = moemesh::cuda_impl::CudaDeviceName(device);
  if (len <= 0) return;
  const size_t n = std::min(name.size(), static_cast<size_t>(len - 1));
  std::memcpy(buf, name.data(), n);
  buf[n] = '\0';
}

// A new backend the caller owns, or null with the error's code and message.
moemesh::ComputeBackend* moemesh_cuda_make_backend(int device, int* code, char* err, int len) {
  auto backend = moemesh::cuda_impl::MakeCudaBackend(device);
  if (backend.ok()) return backend->release();
  *code = static_cast<int>(backend.status().code());
  const std::string msg(backend.status().message());
  if (len > 0) {
    const size_t n = std::min(msg.size(), static_cast<size_t>(len - 1));
    std::memcpy(err, msg.data(), n);
    err[n] = '\0';
  }
  return nullptr;
}

}  // extern "C"
