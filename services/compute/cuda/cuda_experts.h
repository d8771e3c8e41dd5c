// The CUDA DeviceExperts (services/compute/device_experts.h), called directly.
//
// Services reach it through the dlopen'ed library (MakeCudaExperts in cuda_backend.h); the
// device check (tools/gpu/gpu_experts_check.cc), built on a GPU machine without the rest of
// moemesh's dependencies, links the CUDA library and calls this. Plain C++17, no CUDA header.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "services/compute/device_experts.h"

namespace moemesh::cuda_impl {

// CUDA devices this process sees; 0 without a GPU or driver.
int CudaVisibleDevices();

// Uploads every expert's weights to CUDA device `device`; null with *error set when there is
// no such device, when the weights (plus options.reserve_bytes) do not fit in its free memory
// (the message gives both byte counts), or on a CUDA/cuBLAS failure.
std::unique_ptr<DeviceExperts> MakeCudaExperts(int device,
                                               const std::vector<DeviceExpertWeights>& experts,
                                               const DeviceExpertsOptions& options,
                                               std::string* error);

// A row-major BF16 GEMM y[m, n] = x[m, k] · w[n, k]ᵀ (F32 accumulation and output) on device
// buffers the function allocates and fills with zeros; returns its best TFLOP/s over `repeats`
// timed runs after a warm-up, or a negative number with *error set. For the benchmark's peak.
double CudaBf16GemmTflops(int device, int64_t m, int64_t n, int64_t k, int repeats,
                          std::string* error);

}  // namespace moemesh::cuda_impl
