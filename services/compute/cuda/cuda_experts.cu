// CUDA DeviceExperts: a group's expert weights resident on one GPU, and RunExperts as one
// upload, device-side gather, grouped GEMMs, SiLU·mul, weighted sum and one download. See
// services/compute/device_experts.h for the contract.
//
// A call, on one execution context (stream, cuBLAS handle, pinned staging, device scratch):
//   host    bucket the (token, weight) pairs by expert, ascending id ("slots"), and write the
//           tokens, the slot tables and the grouped GEMMs' pointer arrays into pinned staging;
//   H2D     one copy of the staging;
//   gather  xs[s, :] = x[token(s), :] in the compute dtype (BF16 or F32);
//   GEMM 1  per expert, h[slots, 2·inter] = xs · [w1; w3]ᵀ (gate and up fused: the two
//           matrices are stored one above the other); one grouped cuBLAS call;
//   SiLU    a[s, :] = silu(h[s, :inter]) · h[s, inter:] in the compute dtype;
//   GEMM 2  per expert, ys[slots, hidden] = a · w2ᵀ; one grouped cuBLAS call;
//   sum     out[i, :] = Σ over token i's slots, in ascending expert id, weight · ys[slot, :];
//   D2H     one copy of out, then the call's only synchronisation.
// FP8 experts are dequantised into BF16 scratch right before the GEMMs, a chunk of experts at a
// time, so the scratch stays bounded (kFp8Chunk experts) whatever the group's size.
//
// The GEMMs' output (h and ys) is F32 where cuBLAS's grouped GEMM takes it. cuBLAS 13.0 refused
// BF16 inputs with F32 output in cublasGemmGroupedBatchedEx on an H200 (F32 inputs it took), so
// the form is probed at start: grouped with F32 output; for a BF16 group, grouped with BF16
// output (h and ys rounded to BF16, as vLLM's and SGLang's MoE kernels keep them); else one
// cublasGemmEx per expert with F32 output. Which of the grouped form and the per-expert form a
// call uses is DeviceExpertsOptions::gemm_form's choice (by default per call: see there).
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "services/compute/cuda/cuda_experts.h"

namespace moemesh::cuda_impl {
namespace {

constexpr int kThreads = 256;
constexpr int kFp8Chunk = 8;  // FP8 experts dequantised per grouped GEMM
// GemmForm::kAuto runs a call grouped when it touches at least kGroupedMinExperts experts with
// at most kGroupedMaxRows tokens each on average. H200 (cuBLAS 13.0, bf16): a DeepSeek-V3-shaped
// group of 32 experts ran 16-token calls in 0.78 ms grouped against 1.10 ms per expert, 256-token
// calls 1.02 against 1.17, 1,024-token calls 2.78 against 1.78; Mixtral's 8 experts were no
// faster grouped at any size.
constexpr int kGroupedMinExperts = 16;
constexpr int64_t kGroupedMaxRows = 64;
constexpr int64_t kAlign = 256;  // device and staging sections start at multiples of this

int64_t AlignUp(int64_t v) { return (v + kAlign - 1) / kAlign * kAlign; }

std::string CudaText(cudaError_t e) {
  return std::string(cudaGetErrorName(e)) + " (" + cudaGetErrorString(e) + ")";
}

// ---- kernels ------------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ T FromFloat(float v);
template <>
__device__ __forceinline__ float FromFloat<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 FromFloat<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// xs[s, :] = x[slot_token[s], :]. One block per slot.
template <typename T>
__global__ void GatherKernel(const float* __restrict__ x, const int32_t* __restrict__ slot_token,
                             int64_t hidden, T* __restrict__ xs) {
  const int64_t s = blockIdx.x;
  const float* src = x + static_cast<int64_t>(slot_token[s]) * hidden;
  T* dst = xs + s * hidden;
  for (int64_t c = threadIdx.x; c < hidden; c += blockDim.x) dst[c] = FromFloat<T>(src[c]);
}

__device__ __forceinline__ float ToFloat(float v) { return v; }
__device__ __forceinline__ float ToFloat(__nv_bfloat16 v) { return __bfloat162float(v); }

// a[s, j] = silu(h[s, j]) · h[s, inter + j]; slot s's row of h starts at h_off[s] elements, its
// row of a at a_off[s] elements, and its expert's width is inter[s]. One block per slot.
template <typename H, typename T>
__global__ void SiluMulKernel(const H* __restrict__ h, const int64_t* __restrict__ h_off,
                              const int64_t* __restrict__ a_off, const int32_t* __restrict__ inter,
                              T* __restrict__ a) {
  const int64_t s = blockIdx.x;
  const int64_t n = inter[s];
  const H* hr = h + h_off[s];
  T* ar = a + a_off[s];
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    const float g = ToFloat(hr[j]);
    ar[j] = FromFloat<T>(g / (1.0f + expf(-g)) * ToFloat(hr[n + j]));
  }
}

// out[i, c] = Σ_{j in tok_off[i] .. tok_off[i+1]} tok_w[j] · ys[tok_slot[j], c], in that order,
// each product and sum rounded separately (no FMA), as the CPU's `dst += w * src` does.
template <typename Y>
__global__ void WeightedSumKernel(const Y* __restrict__ ys, const int32_t* __restrict__ tok_off,
                                  const int32_t* __restrict__ tok_slot,
                                  const float* __restrict__ tok_w, int64_t hidden,
                                  float* __restrict__ out) {
  const int64_t i = blockIdx.x;
  const int32_t j0 = tok_off[i], j1 = tok_off[i + 1];
  for (int64_t c = threadIdx.x; c < hidden; c += blockDim.x) {
    float acc = 0.0f;
    for (int32_t j = j0; j < j1; ++j) {
      const float y = ToFloat(ys[static_cast<int64_t>(tok_slot[j]) * hidden + c]);
      acc = __fadd_rn(acc, __fmul_rn(tok_w[j], y));
    }
    out[i * hidden + c] = acc;
  }
}

// dst[r, c] (BF16, row-major [rows, cols]) = e4m3(src[r, c]) · scale[r / br, c / bc]. E4M3 is
// decoded through F16 as the CPU does (the byte shifted into an F16 is the value × 2^-8), so
// the NaN codes read as ±480 on both.
__global__ void DequantFp8Kernel(const uint8_t* __restrict__ src, const float* __restrict__ scale,
                                 int64_t rows, int64_t cols, int br, int bc, int64_t scale_cols,
                                 __nv_bfloat16* __restrict__ dst) {
  const int64_t total = rows * cols;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = idx / cols, c = idx % cols;
    const uint8_t v = src[idx];
    const unsigned short hb = static_cast<unsigned short>(((v & 0x80u) << 8) | ((v & 0x7fu) << 7));
    const float f = __half2float(__ushort_as_half(hb)) * 256.0f;
    dst[idx] = __float2bfloat16_rn(f * scale[(r / br) * scale_cols + c / bc]);
  }
}

// Fills n BF16 values with a deterministic pattern in [-1, 1) (the peak GEMM's operands).
__global__ void FillBf16Kernel(__nv_bfloat16* p, int64_t n, uint32_t seed) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    p[i] = __float2bfloat16_rn(static_cast<float>(h & 0xffff) / 32768.0f - 1.0f);
  }
}

int GridFor(int64_t n) {
  return static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t{1} << 16)));
}

// ---- host side ----------------------------------------------------------------------------

// A device or pinned host buffer that only grows.
struct Buffer {
  void* ptr = nullptr;
  int64_t bytes = 0;
  bool pinned = false;
};

void Release(Buffer& b) {
  if (b.ptr == nullptr) return;
  if (b.pinned) {
    cudaFreeHost(b.ptr);
  } else {
    cudaFree(b.ptr);
  }
  b.ptr = nullptr;
  b.bytes = 0;
}

bool Grow(Buffer& b, int64_t need, std::string* error) {
  if (need <= b.bytes) return true;
  const int64_t cap = std::max(need, b.bytes + b.bytes / 2);
  Release(b);
  const cudaError_t e = b.pinned ? cudaMallocHost(&b.ptr, cap) : cudaMalloc(&b.ptr, cap);
  if (e != cudaSuccess) {
    *error = "cannot allocate " + std::to_string(cap) + (b.pinned ? " pinned host" : " device") +
             " bytes of scratch: " + CudaText(e);
    b.ptr = nullptr;
    return false;
  }
  b.bytes = cap;
  return true;
}

// One expert as stored on the device.
struct DevExpert {
  int32_t layer = 0, expert = 0;
  int64_t inter = 0;
  bool fp8 = false;
  // BF16/F32: w13 [2·inter, hidden] (w1 rows then w3 rows) and w2 [hidden, inter], in the
  // compute dtype. FP8: w1, w3, w2 bytes and their scales.
  void* w13 = nullptr;
  void* w2 = nullptr;
  const uint8_t* f1 = nullptr;
  const uint8_t* f3 = nullptr;
  const uint8_t* f2 = nullptr;
  const float* s1 = nullptr;
  const float* s3 = nullptr;
  const float* s2 = nullptr;
  int br = 128, bc = 128;
};

// A call's execution context.
struct Context {
  cudaStream_t stream = nullptr;
  cublasHandle_t cublas = nullptr;
  cudaEvent_t ev[4] = {nullptr, nullptr, nullptr, nullptr};
  Buffer staging{nullptr, 0, true};  // pinned: the upload's source
  Buffer result{nullptr, 0, true};   // pinned: the download's target
  Buffer packed;                     // the upload's device copy
  Buffer xs, h, a, ys, out, deq;     // device scratch
};

class CudaExperts final : public DeviceExperts {
 public:
  CudaExperts(int device, std::string name, int64_t hidden, bool bf16)
      : device_(device), name_(std::move(name)), hidden_(hidden), bf16_(bf16) {}

  ~CudaExperts() override {
    cudaSetDevice(device_);
    for (auto& c : contexts_) {
      if (c->stream != nullptr) cudaStreamSynchronize(c->stream);
      for (Buffer* b :
           {&c->staging, &c->result, &c->packed, &c->xs, &c->h, &c->a, &c->ys, &c->out, &c->deq}) {
        Release(*b);
      }
      for (cudaEvent_t e : c->ev) {
        if (e != nullptr) cudaEventDestroy(e);
      }
      if (c->cublas != nullptr) cublasDestroy(c->cublas);
      if (c->stream != nullptr) cudaStreamDestroy(c->stream);
    }
    if (arena_ != nullptr) cudaFree(arena_);
  }

  std::string device() const override { return name_; }
  int64_t weight_bytes() const override { return weight_bytes_; }
  std::string compute_dtype() const override { return bf16_ ? "bf16" : "f32"; }
  std::string gemm() const override {
    const std::string grouped = out_bf16_ ? "grouped (bf16 out)" : "grouped (f32 out)";
    if (!grouped_ || form_ == DeviceExpertsOptions::GemmForm::kPerExpert) {
      return "per expert (f32 out)";
    }
    if (form_ == DeviceExpertsOptions::GemmForm::kGrouped) return grouped;
    return grouped + " for >= " + std::to_string(kGroupedMinExperts) +
           " experts of <= " + std::to_string(kGroupedMaxRows) +
           " tokens, else per expert (f32 out)";
  }

  // Builds the device copies; false with *error on failure.
  bool Init(const std::vector<DeviceExpertWeights>& experts, const DeviceExpertsOptions& o,
            std::string* error);

  bool Run(const DeviceExpertCall& call, std::string* error, DeviceExpertsTiming* timing) override;

 private:
  Context* Acquire() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return !free_.empty(); });
    Context* c = free_.back();
    free_.pop_back();
    return c;
  }
  void Return(Context* c) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      free_.push_back(c);
    }
    cv_.notify_one();
  }
  bool RunOn(Context& c, const DeviceExpertCall& call, std::string* error,
             DeviceExpertsTiming* timing);
  // Sets grouped_ and out_bf16_ (see the file comment) with a small problem on context c.
  // False with *error only on a CUDA failure.
  bool ProbeGemm(Context& c, bool allow_grouped, std::string* error);
  // One stage's GEMMs for experts [g0, g1) of the call: grouped, or one call each.
  bool Gemms(Context& c, bool grouped, bool out_bf16, int g0, int g1, const std::vector<int>& m,
             const std::vector<int>& n, const std::vector<int>& k, const std::vector<int>& lda,
             const std::vector<int>& ldb, const std::vector<int>& ldc, void* const* dev_a,
             void* const* dev_b, void* const* dev_c, const std::vector<const void*>& host_a,
             const std::vector<const void*>& host_b, const std::vector<void*>& host_c,
             std::string* error);

  const int device_;
  const std::string name_;
  const int64_t hidden_;
  const bool bf16_;        // compute dtype: BF16, else F32
  bool grouped_ = false;   // cuBLAS takes the grouped form; set once by Init
  bool out_bf16_ = false;  // the grouped form's h and ys are BF16 (else F32); set once by Init
  DeviceExpertsOptions::GemmForm form_ = DeviceExpertsOptions::GemmForm::kAuto;
  void* arena_ = nullptr;
  int64_t weight_bytes_ = 0;
  std::vector<DevExpert> experts_;
  std::map<std::pair<int32_t, int32_t>, int> index_;  // (layer, expert) → experts_ index
  std::vector<std::unique_ptr<Context>> contexts_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Context*> free_;  // guarded by mu_
};

// Converts a non-FP8 weight's rows to the compute dtype on the host (BF16 round-to-nearest-
// even, or F32), appended to `out` as raw bytes.
void AppendConverted(const Weight& w, bool bf16, std::vector<uint8_t>* out) {
  const int64_t n = w.rows * w.cols;
  const size_t start = out->size();
  if (!bf16) {
    out->resize(start + n * 4);
    float* dst = reinterpret_cast<float*>(out->data() + start);
    DequantizeRows(w, 0, w.rows, dst);  // a copy for F32
    return;
  }
  out->resize(start + n * 2);
  uint16_t* dst = reinterpret_cast<uint16_t*>(out->data() + start);
  if (w.dtype == DType::kBF16) {
    std::memcpy(dst, w.data, n * 2);
    return;
  }
  std::vector<float> row(w.cols);
  for (int64_t r = 0; r < w.rows; ++r) {
    DequantizeRows(w, r, r + 1, row.data());
    for (int64_t c = 0; c < w.cols; ++c) dst[r * w.cols + c] = FloatToBf16Bits(row[c]);
  }
}

bool CudaExperts::Init(const std::vector<DeviceExpertWeights>& experts,
                       const DeviceExpertsOptions& o, std::string* error) {
  // Lay the arena out: per expert, w13 and w2 (or FP8 bytes and scales).
  struct Plan {
    int64_t w13 = 0, w2 = 0, f1 = 0, f3 = 0, f2 = 0, s1 = 0, s3 = 0, s2 = 0;
  };
  std::vector<Plan> plan(experts.size());
  const int64_t eb = bf16_ ? 2 : 4;
  int64_t total = 0;
  for (size_t i = 0; i < experts.size(); ++i) {
    const DeviceExpertWeights& e = experts[i];
    const int64_t inter = e.w1.rows;
    Plan& p = plan[i];
    if (e.w1.dtype == DType::kF8E4M3) {
      auto put = [&](int64_t bytes) {
        const int64_t at = total;
        total = AlignUp(total + bytes);
        return at;
      };
      p.f1 = put(e.w1.rows * e.w1.cols);
      p.f3 = put(e.w3.rows * e.w3.cols);
      p.f2 = put(e.w2.rows * e.w2.cols);
      p.s1 = put(e.w1.scale_rows() * e.w1.scale_cols() * 4);
      p.s3 = put(e.w3.scale_rows() * e.w3.scale_cols() * 4);
      p.s2 = put(e.w2.scale_rows() * e.w2.scale_cols() * 4);
    } else {
      p.w13 = total;
      total = AlignUp(total + 2 * inter * hidden_ * eb);
      p.w2 = total;
      total = AlignUp(total + hidden_ * inter * eb);
    }
  }
  size_t free_bytes = 0, total_bytes = 0;
  if (const cudaError_t e = cudaMemGetInfo(&free_bytes, &total_bytes); e != cudaSuccess) {
    *error = "cudaMemGetInfo: " + CudaText(e);
    return false;
  }
  if (total + o.reserve_bytes > static_cast<int64_t>(free_bytes)) {
    *error = "the expert group needs " + std::to_string(total) + " bytes of device memory for " +
             std::to_string(experts.size()) + " experts' weights, plus " +
             std::to_string(o.reserve_bytes) + " reserved for calls, but " + name_ + " has " +
             std::to_string(free_bytes) + " bytes free (of " + std::to_string(total_bytes) + ")";
    return false;
  }
  if (total > 0) {
    if (const cudaError_t e = cudaMalloc(&arena_, total); e != cudaSuccess) {
      arena_ = nullptr;
      *error =
          "cannot allocate " + std::to_string(total) + " bytes for the weights: " + CudaText(e);
      return false;
    }
  }
  weight_bytes_ = total;
  uint8_t* base = static_cast<uint8_t*>(arena_);
  std::vector<uint8_t> host;
  auto upload = [&](int64_t at, const void* src, int64_t bytes) {
    const cudaError_t e = cudaMemcpy(base + at, src, bytes, cudaMemcpyHostToDevice);
    if (e != cudaSuccess) *error = "uploading weights: " + CudaText(e);
    return e == cudaSuccess;
  };
  for (size_t i = 0; i < experts.size(); ++i) {
    const DeviceExpertWeights& e = experts[i];
    const Plan& p = plan[i];
    DevExpert d;
    d.layer = e.layer;
    d.expert = e.expert;
    d.inter = e.w1.rows;
    if (e.w1.dtype == DType::kF8E4M3) {
      d.fp8 = true;
      d.br = e.w1.block_rows;
      d.bc = e.w1.block_cols;
      if (!upload(p.f1, e.w1.data, e.w1.rows * e.w1.cols) ||
          !upload(p.f3, e.w3.data, e.w3.rows * e.w3.cols) ||
          !upload(p.f2, e.w2.data, e.w2.rows * e.w2.cols) ||
          !upload(p.s1, e.w1.scale_inv, e.w1.scale_rows() * e.w1.scale_cols() * 4) ||
          !upload(p.s3, e.w3.scale_inv, e.w3.scale_rows() * e.w3.scale_cols() * 4) ||
          !upload(p.s2, e.w2.scale_inv, e.w2.scale_rows() * e.w2.scale_cols() * 4)) {
        return false;
      }
      d.f1 = base + p.f1;
      d.f3 = base + p.f3;
      d.f2 = base + p.f2;
      d.s1 = reinterpret_cast<const float*>(base + p.s1);
      d.s3 = reinterpret_cast<const float*>(base + p.s3);
      d.s2 = reinterpret_cast<const float*>(base + p.s2);
    } else {
      host.clear();
      AppendConverted(e.w1, bf16_, &host);
      AppendConverted(e.w3, bf16_, &host);
      if (!upload(p.w13, host.data(), static_cast<int64_t>(host.size()))) return false;
      host.clear();
      AppendConverted(e.w2, bf16_, &host);
      if (!upload(p.w2, host.data(), static_cast<int64_t>(host.size()))) return false;
      d.w13 = base + p.w13;
      d.w2 = base + p.w2;
    }
    index_[{d.layer, d.expert}] = static_cast<int>(experts_.size());
    experts_.push_back(d);
  }
  for (int i = 0; i < std::max(1, o.contexts); ++i) {
    auto c = std::make_unique<Context>();
    cudaError_t e = cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking);
    for (int j = 0; j < 4 && e == cudaSuccess; ++j) e = cudaEventCreate(&c->ev[j]);
    if (e != cudaSuccess) {
      *error = "creating a stream: " + CudaText(e);
      contexts_.push_back(std::move(c));
      return false;
    }
    cublasStatus_t st = cublasCreate(&c->cublas);
    if (st == CUBLAS_STATUS_SUCCESS) st = cublasSetStream(c->cublas, c->stream);
    // The default math mode keeps F32 GEMMs in IEEE F32 (no TF32).
    if (st == CUBLAS_STATUS_SUCCESS) st = cublasSetMathMode(c->cublas, CUBLAS_DEFAULT_MATH);
    if (st != CUBLAS_STATUS_SUCCESS) {
      *error = std::string("cuBLAS setup: ") + cublasGetStatusString(st);
      contexts_.push_back(std::move(c));
      return false;
    }
    free_.push_back(c.get());
    contexts_.push_back(std::move(c));
  }
  form_ = o.gemm_form;
  return ProbeGemm(*contexts_[0], form_ != DeviceExpertsOptions::GemmForm::kPerExpert, error);
}

bool CudaExperts::ProbeGemm(Context& c, bool allow_grouped, std::string* error) {
  grouped_ = false;
  out_bf16_ = false;
  if (!allow_grouped) return true;
  // Two groups of a 32 × 16 × 64 product, as RunOn lays them out: A and B in the compute dtype,
  // C in the output dtype tried, the pointer arrays on the device.
  constexpr int kM = 32, kN = 16, kK = 64, kGroups = 2;
  const int64_t eb = bf16_ ? 2 : 4;
  void* mem = nullptr;
  const int64_t a_bytes = kM * kK * eb, b_bytes = kN * kK * eb, c_bytes = kM * kN * 4;
  const int64_t ptr_at = kGroups * (a_bytes + b_bytes + c_bytes);
  cudaError_t e = cudaMalloc(&mem, ptr_at + 3 * kGroups * sizeof(void*));
  if (e != cudaSuccess) {
    *error = "probing the grouped GEMM: " + CudaText(e);
    return false;
  }
  e = cudaMemsetAsync(mem, 0, ptr_at, c.stream);
  uint8_t* base = static_cast<uint8_t*>(mem);
  void* ptrs[3 * kGroups];
  for (int g = 0; g < kGroups; ++g) {
    ptrs[g] = base + g * a_bytes;
    ptrs[kGroups + g] = base + kGroups * a_bytes + g * b_bytes;
    ptrs[2 * kGroups + g] = base + kGroups * (a_bytes + b_bytes) + g * c_bytes;
  }
  if (e == cudaSuccess) {
    e = cudaMemcpyAsync(base + ptr_at, ptrs, sizeof(ptrs), cudaMemcpyHostToDevice, c.stream);
  }
  if (e == cudaSuccess) e = cudaStreamSynchronize(c.stream);
  if (e != cudaSuccess) {
    cudaFree(mem);
    *error = "probing the grouped GEMM: " + CudaText(e);
    return false;
  }
  void* const* dev = reinterpret_cast<void* const*>(base + ptr_at);
  const cudaDataType_t ab = bf16_ ? CUDA_R_16BF : CUDA_R_32F;
  std::vector<cublasOperation_t> ta(kGroups, CUBLAS_OP_T), tb(kGroups, CUBLAS_OP_N);
  std::vector<int> m(kGroups, kM), n(kGroups, kN), k(kGroups, kK), size(kGroups, 1);
  std::vector<int> ldc(kGroups, kM);
  std::vector<float> alpha(kGroups, 1.0f), beta(kGroups, 0.0f);
  for (const bool bf16_out : {false, true}) {
    if (bf16_out && !bf16_) break;
    const cublasStatus_t st = cublasGemmGroupedBatchedEx(
        c.cublas, ta.data(), tb.data(), m.data(), n.data(), k.data(), alpha.data(),
        const_cast<const void* const*>(dev), ab, k.data(),
        const_cast<const void* const*>(dev + kGroups), ab, k.data(), beta.data(), dev + 2 * kGroups,
        bf16_out ? CUDA_R_16BF : CUDA_R_32F, ldc.data(), kGroups, size.data(), CUBLAS_COMPUTE_32F);
    if (st == CUBLAS_STATUS_SUCCESS) {
      grouped_ = true;
      out_bf16_ = bf16_out;
      break;
    }
  }
  e = cudaStreamSynchronize(c.stream);
  cudaFree(mem);
  if (e != cudaSuccess) {
    *error = "probing the grouped GEMM: " + CudaText(e);
    return false;
  }
  return true;
}

bool CudaExperts::Run(const DeviceExpertCall& call, std::string* error,
                      DeviceExpertsTiming* timing) {
  const int64_t n = call.num_tokens;
  if (n <= 0) return true;
  const int32_t assigned = call.offsets[n];
  for (int32_t j = 0; j < assigned; ++j) {
    if (index_.find({call.layer, call.experts[j]}) == index_.end()) {
      *error = "expert (layer " + std::to_string(call.layer) + ", expert " +
               std::to_string(call.experts[j]) + ") is not held on " + name_;
      return false;
    }
  }
  if (assigned == 0) {
    std::memset(call.out, 0, static_cast<size_t>(n * hidden_) * sizeof(float));
    return true;
  }
  if (const cudaError_t e = cudaSetDevice(device_); e != cudaSuccess) {
    *error = "cudaSetDevice: " + CudaText(e);
    return false;
  }
  Context* c = Acquire();
  const bool ok = RunOn(*c, call, error, timing);
  if (!ok) cudaStreamSynchronize(c->stream);  // nothing of a failed call outlives it
  Return(c);
  return ok;
}

bool CudaExperts::Gemms(Context& c, bool grouped, bool out_bf16, int g0, int g1,
                        const std::vector<int>& m, const std::vector<int>& n,
                        const std::vector<int>& k, const std::vector<int>& lda,
                        const std::vector<int>& ldb, const std::vector<int>& ldc,
                        void* const* dev_a, void* const* dev_b, void* const* dev_c,
                        const std::vector<const void*>& host_a,
                        const std::vector<const void*>& host_b, const std::vector<void*>& host_c,
                        std::string* error) {
  const int groups = g1 - g0;
  if (groups <= 0) return true;
  const cudaDataType_t ab = bf16_ ? CUDA_R_16BF : CUDA_R_32F;
  if (grouped) {
    std::vector<cublasOperation_t> ta(groups, CUBLAS_OP_T), tb(groups, CUBLAS_OP_N);
    std::vector<float> alpha(groups, 1.0f), beta(groups, 0.0f);
    std::vector<int> size(groups, 1);
    const cublasStatus_t st = cublasGemmGroupedBatchedEx(
        c.cublas, ta.data(), tb.data(), m.data() + g0, n.data() + g0, k.data() + g0, alpha.data(),
        const_cast<const void* const*>(dev_a + g0), ab, lda.data() + g0,
        const_cast<const void* const*>(dev_b + g0), ab, ldb.data() + g0, beta.data(), dev_c + g0,
        out_bf16 ? CUDA_R_16BF : CUDA_R_32F, ldc.data() + g0, groups, size.data(),
        CUBLAS_COMPUTE_32F);
    if (st != CUBLAS_STATUS_SUCCESS) {
      *error = std::string("cublasGemmGroupedBatchedEx: ") + cublasGetStatusString(st);
      return false;
    }
    return true;
  }
  const float alpha = 1.0f, beta = 0.0f;
  for (int g = g0; g < g1; ++g) {
    const cublasStatus_t st =
        cublasGemmEx(c.cublas, CUBLAS_OP_T, CUBLAS_OP_N, m[g], n[g], k[g], &alpha, host_a[g], ab,
                     lda[g], host_b[g], ab, ldb[g], &beta, host_c[g], CUDA_R_32F, ldc[g],
                     CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    if (st != CUBLAS_STATUS_SUCCESS) {
      *error = std::string("cublasGemmEx: ") + cublasGetStatusString(st);
      return false;
    }
  }
  return true;
}

bool CudaExperts::RunOn(Context& c, const DeviceExpertCall& call, std::string* error,
                        DeviceExpertsTiming* timing) {
  const int64_t n = call.num_tokens;
  const int64_t hidden = hidden_;
  const int64_t eb = bf16_ ? 2 : 4;
  // Bucket the assignments by expert, ascending id; a slot is one (token, expert) pair.
  std::map<int32_t, std::vector<int32_t>> by_expert;  // expert id → assignment indices
  for (int64_t i = 0; i < n; ++i) {
    for (int32_t j = call.offsets[i]; j < call.offsets[i + 1]; ++j) {
      by_expert[call.experts[j]].push_back(j);
    }
  }
  const int groups = static_cast<int>(by_expert.size());
  const int64_t slots = call.offsets[n];
  std::vector<int32_t> slot_token(slots), slot_of_assignment(slots), slot_inter(slots);
  std::vector<int64_t> h_off(slots), a_off(slots);
  std::vector<int> ex(groups), m1(groups), n1(groups), k1(groups), lda1(groups), ldb1(groups),
      ldc1(groups), m2(groups), k2(groups), lda2(groups), ldb2(groups), ldc2(groups);
  std::vector<int64_t> first_slot(groups), h_base(groups), a_base(groups);
  std::vector<int32_t> token_of(slots);
  for (int64_t i = 0; i < n; ++i) {
    for (int32_t j = call.offsets[i]; j < call.offsets[i + 1]; ++j) token_of[j] = i;
  }
  int64_t s = 0, h_total = 0, a_total = 0;
  int g = 0;
  for (const auto& [expert, list] : by_expert) {
    const int idx = index_.at({call.layer, expert});
    const DevExpert& d = experts_[idx];
    ex[g] = idx;
    first_slot[g] = s;
    h_base[g] = h_total;
    a_base[g] = a_total;
    const int64_t rows = static_cast<int64_t>(list.size());
    for (int64_t r = 0; r < rows; ++r, ++s) {
      slot_token[s] = token_of[list[r]];
      slot_of_assignment[list[r]] = static_cast<int32_t>(s);
      slot_inter[s] = static_cast<int32_t>(d.inter);
      h_off[s] = h_total + r * 2 * d.inter;
      a_off[s] = a_total + r * d.inter;
    }
    // Column-major cuBLAS sees row-major [rows, cols] as its transpose, so y = x · wᵀ is
    // computed as yᵀ = op_T(wᵀ) · xᵀ: m = w's rows, n = tokens, k = w's columns.
    m1[g] = static_cast<int>(2 * d.inter);
    n1[g] = static_cast<int>(rows);
    k1[g] = static_cast<int>(hidden);
    lda1[g] = static_cast<int>(hidden);
    ldb1[g] = static_cast<int>(hidden);
    ldc1[g] = static_cast<int>(2 * d.inter);
    m2[g] = static_cast<int>(hidden);
    k2[g] = static_cast<int>(d.inter);
    lda2[g] = static_cast<int>(d.inter);
    ldb2[g] = static_cast<int>(d.inter);
    ldc2[g] = static_cast<int>(hidden);
    h_total += rows * 2 * d.inter;
    a_total += rows * d.inter;
    ++g;
  }
  // Token i's slots, ascending expert id (the order its contributions are summed in).
  std::vector<int32_t> tok_off(n + 1), tok_slot(slots);
  std::vector<float> tok_w(slots);
  {
    int64_t t = 0;
    std::vector<std::pair<int32_t, int32_t>> order;  // (expert, assignment)
    for (int64_t i = 0; i < n; ++i) {
      tok_off[i] = static_cast<int32_t>(t);
      order.clear();
      for (int32_t j = call.offsets[i]; j < call.offsets[i + 1]; ++j) {
        order.push_back({call.experts[j], j});
      }
      std::sort(order.begin(), order.end());
      for (const auto& [expert, j] : order) {
        tok_slot[t] = slot_of_assignment[j];
        tok_w[t] = call.weights[j];
        ++t;
      }
    }
    tok_off[n] = static_cast<int32_t>(t);
  }

  // Device scratch.
  bool fp8_any = false;
  for (int gi = 0; gi < groups; ++gi) fp8_any = fp8_any || experts_[ex[gi]].fp8;
  int64_t deq_per = 0;  // BF16 elements of one dequantised expert
  if (fp8_any) {
    for (int gi = 0; gi < groups; ++gi) {
      const DevExpert& d = experts_[ex[gi]];
      if (d.fp8) deq_per = std::max(deq_per, 3 * d.inter * hidden);
    }
  }
  // This call's GEMM form (see DeviceExpertsOptions::GemmForm) and so its output dtype.
  const bool grouped =
      grouped_ && (form_ == DeviceExpertsOptions::GemmForm::kGrouped ||
                   (form_ == DeviceExpertsOptions::GemmForm::kAuto &&
                    groups >= kGroupedMinExperts && slots <= kGroupedMaxRows * groups));
  const bool out_bf16 = grouped && out_bf16_;
  const int64_t ob = out_bf16 ? 2 : 4;  // bytes per element of h and ys
  if (!Grow(c.xs, slots * hidden * eb, error) || !Grow(c.h, h_total * ob, error) ||
      !Grow(c.a, std::max<int64_t>(a_total, 1) * eb, error) ||
      !Grow(c.ys, slots * hidden * ob, error) || !Grow(c.out, n * hidden * 4, error) ||
      (fp8_any && !Grow(c.deq, AlignUp(deq_per * 2) * kFp8Chunk, error))) {
    return false;
  }
  uint8_t* xs = static_cast<uint8_t*>(c.xs.ptr);
  uint8_t* h = static_cast<uint8_t*>(c.h.ptr);
  uint8_t* a = static_cast<uint8_t*>(c.a.ptr);
  uint8_t* ys = static_cast<uint8_t*>(c.ys.ptr);
  float* out = static_cast<float*>(c.out.ptr);
  uint8_t* deq = static_cast<uint8_t*>(c.deq.ptr);

  // The grouped GEMMs' operands (host view) and the pointer arrays (device copies).
  std::vector<const void*> a1(groups), b1(groups), a2(groups), b2(groups);
  std::vector<void*> c1(groups), c2(groups);
  int fp8_index = 0;  // the expert's index among the call's FP8 experts
  for (int gi = 0; gi < groups; ++gi) {
    const DevExpert& d = experts_[ex[gi]];
    if (d.fp8) {
      // Where this expert's BF16 copy goes: its FP8 index modulo the chunk, which is the
      // chunk's own scratch when the chunks run one by one.
      uint8_t* slot = deq + AlignUp(deq_per * 2) * (fp8_index++ % kFp8Chunk);
      a1[gi] = slot;
      a2[gi] = slot + 2 * d.inter * hidden * 2;
    } else {
      a1[gi] = d.w13;
      a2[gi] = d.w2;
    }
    b1[gi] = xs + first_slot[gi] * hidden * eb;
    c1[gi] = h + h_base[gi] * ob;
    b2[gi] = a + a_base[gi] * eb;
    c2[gi] = ys + first_slot[gi] * hidden * ob;
  }

  // Staging layout (each section aligned): x rows, slot_token, h_off, a_off, slot_inter,
  // tok_off, tok_slot, tok_w, then the six pointer arrays.
  const int64_t o_x = 0;
  const int64_t o_st = AlignUp(o_x + n * hidden * 4);
  const int64_t o_ho = AlignUp(o_st + slots * 4);
  const int64_t o_ao = AlignUp(o_ho + slots * 8);
  const int64_t o_si = AlignUp(o_ao + slots * 8);
  const int64_t o_to = AlignUp(o_si + slots * 4);
  const int64_t o_ts = AlignUp(o_to + (n + 1) * 4);
  const int64_t o_tw = AlignUp(o_ts + slots * 4);
  const int64_t o_p = AlignUp(o_tw + slots * 4);
  const int64_t bytes = o_p + 6 * groups * 8;
  if (!Grow(c.staging, bytes, error) || !Grow(c.packed, bytes, error) ||
      !Grow(c.result, n * hidden * 4, error)) {
    return false;
  }
  uint8_t* st = static_cast<uint8_t*>(c.staging.ptr);
  for (int64_t i = 0; i < n; ++i) {
    std::memcpy(st + o_x + i * hidden * 4, call.token_rows[i], hidden * 4);
  }
  std::memcpy(st + o_st, slot_token.data(), slots * 4);
  std::memcpy(st + o_ho, h_off.data(), slots * 8);
  std::memcpy(st + o_ao, a_off.data(), slots * 8);
  std::memcpy(st + o_si, slot_inter.data(), slots * 4);
  std::memcpy(st + o_to, tok_off.data(), (n + 1) * 4);
  std::memcpy(st + o_ts, tok_slot.data(), slots * 4);
  std::memcpy(st + o_tw, tok_w.data(), slots * 4);
  const void** ptrs = reinterpret_cast<const void**>(st + o_p);
  for (int gi = 0; gi < groups; ++gi) {
    ptrs[0 * groups + gi] = a1[gi];
    ptrs[1 * groups + gi] = b1[gi];
    ptrs[2 * groups + gi] = c1[gi];
    ptrs[3 * groups + gi] = a2[gi];
    ptrs[4 * groups + gi] = b2[gi];
    ptrs[5 * groups + gi] = c2[gi];
  }
  uint8_t* dp = static_cast<uint8_t*>(c.packed.ptr);
  void* const* dev_a1 = reinterpret_cast<void* const*>(dp + o_p);
  void* const* dev_b1 = dev_a1 + groups;
  void* const* dev_c1 = dev_a1 + 2 * groups;
  void* const* dev_a2 = dev_a1 + 3 * groups;
  void* const* dev_b2 = dev_a1 + 4 * groups;
  void* const* dev_c2 = dev_a1 + 5 * groups;

  cudaError_t e = cudaSuccess;
  auto check = [&](const char* what) {
    if (e == cudaSuccess) e = cudaGetLastError();
    if (e != cudaSuccess) *error = std::string(what) + ": " + CudaText(e);
    return e == cudaSuccess;
  };
  if (timing != nullptr) cudaEventRecord(c.ev[0], c.stream);
  e = cudaMemcpyAsync(dp, st, bytes, cudaMemcpyHostToDevice, c.stream);
  if (!check("upload")) return false;
  if (timing != nullptr) cudaEventRecord(c.ev[1], c.stream);

  const float* dx = reinterpret_cast<const float*>(dp + o_x);
  const int32_t* d_st = reinterpret_cast<const int32_t*>(dp + o_st);
  if (bf16_) {
    GatherKernel<__nv_bfloat16><<<static_cast<unsigned>(slots), kThreads, 0, c.stream>>>(
        dx, d_st, hidden, reinterpret_cast<__nv_bfloat16*>(xs));
  } else {
    GatherKernel<float><<<static_cast<unsigned>(slots), kThreads, 0, c.stream>>>(
        dx, d_st, hidden, reinterpret_cast<float*>(xs));
  }
  if (!check("gather")) return false;

  // Experts in chunks: all at once without FP8; kFp8Chunk FP8 experts per chunk otherwise.
  int g0 = 0;
  while (g0 < groups) {
    int g1 = g0;
    int fp8_in_chunk = 0;
    while (g1 < groups && !(experts_[ex[g1]].fp8 && fp8_in_chunk == kFp8Chunk)) {
      if (experts_[ex[g1]].fp8) ++fp8_in_chunk;
      ++g1;
    }
    for (int gi = g0; gi < g1; ++gi) {
      const DevExpert& d = experts_[ex[gi]];
      if (!d.fp8) continue;
      __nv_bfloat16* w13 = const_cast<__nv_bfloat16*>(static_cast<const __nv_bfloat16*>(a1[gi]));
      __nv_bfloat16* w2 = const_cast<__nv_bfloat16*>(static_cast<const __nv_bfloat16*>(a2[gi]));
      const int64_t sc_h = (hidden + d.bc - 1) / d.bc;
      const int64_t sc_i = (d.inter + d.bc - 1) / d.bc;
      DequantFp8Kernel<<<GridFor(d.inter * hidden), kThreads, 0, c.stream>>>(
          d.f1, d.s1, d.inter, hidden, d.br, d.bc, sc_h, w13);
      DequantFp8Kernel<<<GridFor(d.inter * hidden), kThreads, 0, c.stream>>>(
          d.f3, d.s3, d.inter, hidden, d.br, d.bc, sc_h, w13 + d.inter * hidden);
      DequantFp8Kernel<<<GridFor(d.inter * hidden), kThreads, 0, c.stream>>>(
          d.f2, d.s2, hidden, d.inter, d.br, d.bc, sc_i, w2);
    }
    if (!check("fp8 dequantisation")) return false;
    if (!Gemms(c, grouped, out_bf16, g0, g1, m1, n1, k1, lda1, ldb1, ldc1, dev_a1, dev_b1, dev_c1,
               a1, b1, c1, error)) {
      return false;
    }
    // SiLU·mul for the chunk's slots.
    const int64_t s0 = first_slot[g0];
    const int64_t s1 = g1 < groups ? first_slot[g1] : slots;
    const int64_t* d_ho = reinterpret_cast<const int64_t*>(dp + o_ho) + s0;
    const int64_t* d_ao = reinterpret_cast<const int64_t*>(dp + o_ao) + s0;
    const int32_t* d_si = reinterpret_cast<const int32_t*>(dp + o_si) + s0;
    const unsigned blocks = static_cast<unsigned>(s1 - s0);
    if (out_bf16) {  // only with BF16 compute
      SiluMulKernel<<<blocks, kThreads, 0, c.stream>>>(reinterpret_cast<const __nv_bfloat16*>(h),
                                                       d_ho, d_ao, d_si,
                                                       reinterpret_cast<__nv_bfloat16*>(a));
    } else if (bf16_) {
      SiluMulKernel<<<blocks, kThreads, 0, c.stream>>>(
          reinterpret_cast<const float*>(h), d_ho, d_ao, d_si, reinterpret_cast<__nv_bfloat16*>(a));
    } else {
      SiluMulKernel<<<blocks, kThreads, 0, c.stream>>>(reinterpret_cast<const float*>(h), d_ho,
                                                       d_ao, d_si, reinterpret_cast<float*>(a));
    }
    if (!check("silu")) return false;
    if (!Gemms(c, grouped, out_bf16, g0, g1, m2, n1, k2, lda2, ldb2, ldc2, dev_a2, dev_b2, dev_c2,
               a2, b2, c2, error)) {
      return false;
    }
    g0 = g1;
  }
  const int32_t* d_to = reinterpret_cast<const int32_t*>(dp + o_to);
  const int32_t* d_ts = reinterpret_cast<const int32_t*>(dp + o_ts);
  const float* d_tw = reinterpret_cast<const float*>(dp + o_tw);
  if (out_bf16) {
    WeightedSumKernel<<<static_cast<unsigned>(n), kThreads, 0, c.stream>>>(
        reinterpret_cast<const __nv_bfloat16*>(ys), d_to, d_ts, d_tw, hidden, out);
  } else {
    WeightedSumKernel<<<static_cast<unsigned>(n), kThreads, 0, c.stream>>>(
        reinterpret_cast<const float*>(ys), d_to, d_ts, d_tw, hidden, out);
  }
  if (!check("weighted sum")) return false;
  if (timing != nullptr) cudaEventRecord(c.ev[2], c.stream);
  e = cudaMemcpyAsync(c.result.ptr, out, n * hidden * 4, cudaMemcpyDeviceToHost, c.stream);
  if (!check("download")) return false;
  if (timing != nullptr) cudaEventRecord(c.ev[3], c.stream);
  e = cudaStreamSynchronize(c.stream);
  if (!check("synchronise")) return false;
  std::memcpy(call.out, c.result.ptr, static_cast<size_t>(n * hidden) * 4);
  if (timing != nullptr) {
    float ms[3] = {0, 0, 0};
    for (int i = 0; i < 3; ++i) cudaEventElapsedTime(&ms[i], c.ev[i], c.ev[i + 1]);
    timing->host_to_device = ms[0] / 1e3;
    timing->compute = ms[1] / 1e3;
    timing->device_to_host = ms[2] / 1e3;
    timing->grouped = grouped;
  }
  return true;
}

}  // namespace

int CudaVisibleDevices() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
}

std::unique_ptr<DeviceExperts> MakeCudaExperts(int device,
                                               const std::vector<DeviceExpertWeights>& experts,
                                               const DeviceExpertsOptions& options,
                                               std::string* error) {
  int count = 0;
  if (const cudaError_t e = cudaGetDeviceCount(&count); e != cudaSuccess) {
    cudaGetLastError();
    *error = "no usable CUDA device (no GPU or driver?): " + CudaText(e);
    return nullptr;
  }
  if (device < 0 || device >= count) {
    *error = "CUDA device " + std::to_string(device) + " does not exist (" + std::to_string(count) +
             " visible)";
    return nullptr;
  }
  if (const cudaError_t e = cudaSetDevice(device); e != cudaSuccess) {
    *error = "cudaSetDevice: " + CudaText(e);
    return nullptr;
  }
  cudaDeviceProp prop;
  std::string name = "cuda:" + std::to_string(device);
  if (cudaGetDeviceProperties(&prop, device) == cudaSuccess) name += std::string(" ") + prop.name;
  if (experts.empty()) {
    *error = "no experts to hold";
    return nullptr;
  }
  const int64_t hidden = experts[0].w1.cols;
  bool all_f32 = true;
  for (const DeviceExpertWeights& e : experts) {
    const bool shapes_ok = e.w1.cols == hidden && e.w3.rows == e.w1.rows && e.w3.cols == hidden &&
                           e.w2.rows == hidden && e.w2.cols == e.w1.rows && e.w1.rows > 0 &&
                           !e.w1.empty() && !e.w3.empty() && !e.w2.empty();
    const bool same_dtype = e.w3.dtype == e.w1.dtype && e.w2.dtype == e.w1.dtype;
    if (!shapes_ok || !same_dtype) {
      *error = "expert (layer " + std::to_string(e.layer) + ", expert " + std::to_string(e.expert) +
               ") has inconsistent weight shapes or dtypes";
      return nullptr;
    }
    all_f32 = all_f32 && e.w1.dtype == DType::kF32;
  }
  auto d = std::make_unique<CudaExperts>(device, name, hidden, /*bf16=*/!all_f32);
  if (!d->Init(experts, options, error)) return nullptr;
  return d;
}

double CudaBf16GemmTflops(int device, int64_t m, int64_t n, int64_t k, int repeats,
                          std::string* error) {
  if (const cudaError_t e = cudaSetDevice(device); e != cudaSuccess) {
    *error = "cudaSetDevice: " + CudaText(e);
    return -1;
  }
  void *x = nullptr, *w = nullptr, *y = nullptr;
  cudaStream_t stream = nullptr;
  cublasHandle_t h = nullptr;
  cudaEvent_t e0 = nullptr, e1 = nullptr;
  double best = -1;
  cudaError_t e = cudaMalloc(&x, m * k * 2);
  if (e == cudaSuccess) e = cudaMalloc(&w, n * k * 2);
  if (e == cudaSuccess) e = cudaMalloc(&y, m * n * 4);
  if (e == cudaSuccess) e = cudaStreamCreate(&stream);
  if (e == cudaSuccess) e = cudaEventCreate(&e0);
  if (e == cudaSuccess) e = cudaEventCreate(&e1);
  if (e != cudaSuccess) {
    *error = "peak GEMM setup: " + CudaText(e);
  } else if (cublasCreate(&h) != CUBLAS_STATUS_SUCCESS) {
    *error = "cublasCreate failed";
  } else {
    cublasSetStream(h, stream);
    FillBf16Kernel<<<GridFor(m * k), kThreads, 0, stream>>>(static_cast<__nv_bfloat16*>(x), m * k,
                                                            1);
    FillBf16Kernel<<<GridFor(n * k), kThreads, 0, stream>>>(static_cast<__nv_bfloat16*>(w), n * k,
                                                            2);
    const float alpha = 1.0f, beta = 0.0f;
    for (int r = 0; r <= repeats; ++r) {
      cudaEventRecord(e0, stream);
      const cublasStatus_t st =
          cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(m),
                       static_cast<int>(k), &alpha, w, CUDA_R_16BF, static_cast<int>(k), x,
                       CUDA_R_16BF, static_cast<int>(k), &beta, y, CUDA_R_32F, static_cast<int>(n),
                       CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
      cudaEventRecord(e1, stream);
      if (st != CUBLAS_STATUS_SUCCESS) {
        *error = std::string("cublasGemmEx: ") + cublasGetStatusString(st);
        best = -1;
        break;
      }
      cudaEventSynchronize(e1);
      float ms = 0;
      cudaEventElapsedTime(&ms, e0, e1);
      if (r > 0 && ms > 0) best = std::max(best, 2.0 * m * n * k / (ms * 1e-3) / 1e12);
    }
  }
  if (h != nullptr) cublasDestroy(h);
  if (e0 != nullptr) cudaEventDestroy(e0);
  if (e1 != nullptr) cudaEventDestroy(e1);
  if (stream != nullptr) cudaStreamDestroy(stream);
  for (void* p : {x, w, y}) {
    if (p != nullptr) cudaFree(p);
  }
  return best;
}

}  // namespace moemesh::cuda_impl

// The C entry point that services/compute/cuda/cuda_loader.cc finds with dlsym (see the note at
// the end of cuda_backend.cu): a new DeviceExperts the caller owns, or null with the error.
extern "C" moemesh::DeviceExperts* moemesh_cuda_make_experts(
    int device, const moemesh::DeviceExpertWeights* experts, int count,
    const moemesh::DeviceExpertsOptions* options, char* err, int len) {
  std::string error;
  std::unique_ptr<moemesh::DeviceExperts> d = moemesh::cuda_impl::MakeCudaExperts(
      device, std::vector<moemesh::DeviceExpertWeights>(experts, experts + count), *options,
      &error);
  if (d != nullptr) return d.release();
  if (len > 0) {
    const size_t n = std::min(error.size(), static_cast<size_t>(len - 1));
    std::memcpy(err, error.data(), n);
    err[n] = '\0';
  }
  return nullptr;
}
