// DeviceExperts: an expert group's weights resident on an accelerator, and one call that runs a
// layer's whole expert computation there.
//
//   std::vector<DeviceExpertWeights> w = ...;              // host weights, checkpoint dtype
//   std::string error;
//   std::unique_ptr<DeviceExperts> d = MakeCudaExperts(/*device=*/0, w, {}, &error);
//   if (!d) { /* error says why: no device, or "needs N bytes, device has M free" */ }
//   d->Run(call, &error, /*timing=*/nullptr);              // host buffers in and out
//
// Unlike ComputeBackend, whose ops each take host buffers and copy them, a Run is the worker's
// whole RunExperts: the tokens go to the device once, are gathered per expert there, the
// experts' products run as grouped GEMMs, the SiLU·mul and the weighted sum back into token
// order stay on the device, and the result comes back once. All weights are uploaded when the
// object is made (never lazily), so a group that does not fit fails at start, not mid-serving.
//
// Numerics. BF16 weights compute in BF16 (activations rounded to BF16, products accumulated in
// F32, the gate/up result and the output in F32); FP8 E4M3 weights keep their bytes and block
// scales on the device and are dequantised into BF16 per call, expert by expert; F16 weights
// are converted to BF16 when uploaded; F32 weights compute in IEEE F32 (no TF32), so an F32
// model agrees with the CPU to float rounding. A token's expert outputs are summed in ascending
// expert id, as LocalExpertGroup does; results never depend on atomics. A token's result can
// depend on the other tokens of its call through the call's shape: cuBLAS chooses its algorithm
// by shape, and GemmForm::kAuto chooses between the grouped form (BF16 GEMM outputs for a BF16
// group) and the per-expert form (F32 outputs) by the call's experts and tokens. The CPU
// kernels are batch-invariant; the GPU path is not (a deterministic GPU mode would fix the
// form and the algorithms).
//
// Thread safety: Run may be called from any number of threads at once. Each call takes one of
// a few execution contexts (a CUDA stream, a cuBLAS handle, pinned staging and device scratch),
// so calls overlap on the device; a call waits only when all contexts are busy.
//
// Plain C++17 with no CUDA header, so that host code and the device-only build include it.
// The implementation (services/compute/cuda/cuda_experts.cu) is built only when nvcc is found.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "services/tensor/weight.h"

namespace moemesh {

// One (layer, expert) FFN: y = w2(silu(w1 x) * w3 x). All experts of a group share `hidden`;
// the intermediate width may differ (DeepSeek's shared experts are wider).
struct DeviceExpertWeights {
  int32_t layer = 0;
  int32_t expert = 0;  // a routed id, or any id the caller uses for shared experts (e.g. -1)
  Weight w1;           // gate_proj: [inter, hidden]
  Weight w3;           // up_proj:   [inter, hidden]
  Weight w2;           // down_proj: [hidden, inter]
};

// One RunExperts call: token i goes to experts[offsets[i] .. offsets[i+1]) with weights
// weights[...]; out[i, :] = Σ weight · expert(token i), summed in ascending expert id.
struct DeviceExpertCall {
  int32_t layer = 0;
  int64_t num_tokens = 0;
  const float* const* token_rows = nullptr;  // [num_tokens] pointers to [hidden] f32 rows
  const int32_t* offsets = nullptr;          // [num_tokens + 1], offsets[0] = 0, non-decreasing
  const int32_t* experts = nullptr;          // [offsets[num_tokens]] expert ids of `layer`
  const float* weights = nullptr;            // [offsets[num_tokens]]
  float* out = nullptr;                      // [num_tokens, hidden] f32
};

struct DeviceExpertsOptions {
  int contexts = 4;  // calls that may run on the device at once
  // Bytes of device memory left free beyond weights and the first calls' scratch; the group
  // refuses to start when the device cannot hold weights + this.
  int64_t reserve_bytes = int64_t{1} << 30;
  // How a call's expert products run: kAuto picks per call (below), kGrouped always uses one
  // grouped cuBLAS call per stage where cuBLAS takes the form, kPerExpert one call per expert.
  // kAuto groups calls that touch many experts with few tokens each (decode): there the grouped
  // call saves per-GEMM launches; with many tokens per expert, separate GEMMs run much faster
  // (H200, cuBLAS 13.0: 85 % of the BF16 peak at 4,096 tokens against 37 % grouped).
  enum class GemmForm { kAuto, kGrouped, kPerExpert };
  GemmForm gemm_form = GemmForm::kAuto;
};

// Where one Run's time went, for benchmarks; seconds of device time between CUDA events.
struct DeviceExpertsTiming {
  double host_to_device = 0;  // the one upload (tokens, routing tables)
  double compute = 0;         // gather, GEMMs, SiLU·mul, weighted sum
  double device_to_host = 0;  // the one download
  bool grouped = false;       // whether the call ran grouped GEMMs
};

class DeviceExperts {
 public:
  virtual ~DeviceExperts() = default;
  // "cuda:0 NVIDIA H200".
  virtual std::string device() const = 0;
  // Device bytes the weights occupy (FP8 scales included).
  virtual int64_t weight_bytes() const = 0;
  // The compute dtype's name: "bf16" or "f32".
  virtual std::string compute_dtype() const = 0;
  // How the expert products run, e.g. "grouped (bf16 out) for >= 16 experts of <= 64 tokens,
  // else per expert (f32 out)".
  virtual std::string gemm() const = 0;
  // Runs `call`; false with *error set when an expert is not held or the device fails. The
  // caller validates offsets and shapes (ValidateExpertBatch) before calling. When `timing` is
  // not null the call also records where its time went (CUDA events around each stage).
  [[nodiscard]] virtual bool Run(const DeviceExpertCall& call, std::string* error,
                                 DeviceExpertsTiming* timing) = 0;
};

}  // namespace moemesh
