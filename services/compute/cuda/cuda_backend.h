// The CUDA ComputeBackend: cuBLAS GEMMs in full F32 and simple kernels for the rest, on one GPU.
//
//   if (CudaDeviceCount() > 0) {
//     ASSIGN_OR_RETURN(std::unique_ptr<ComputeBackend> be, MakeCudaBackend(/*device=*/0));
//     be->ExpertFfn(x, m, hidden, inter, w1, w3, w2, workspace, y);  // host pointers in and out
//   }
//
// The backend keeps ComputeBackend's host-memory contract: every call copies its activations
// host → device, runs on the device and copies the result back before it returns, so it is a
// drop-in replacement for the CPU backend and agrees with it to float rounding (GEMMs use
// CUBLAS_COMPUTE_32F, never TF32; the checks are in tests/gpu/backend_conformance_test.cc).
//
// Weights (`w` of MatMulT, w1/w3/w2 of ExpertFfn, the RmsNorm weight) are uploaded once and kept
// on the device for the life of the backend, keyed by (host address, byte size). The caller
// promises what every moemesh model already does: a weight's host memory is neither modified nor
// freed and reused for another tensor while the backend lives. (As a guard against reuse the
// cache also compares a sampled fingerprint of the host data on every hit and re-uploads when
// it changed; that catches a recycled address with different contents but is not a full check.)
// Device memory for weights is never released before the backend is destroyed.
//
// Thread safety: one instance may be shared by any number of threads. Each instance owns one
// CUDA stream, one cuBLAS handle, its scratch buffers and its weight cache, all guarded by one
// mutex, so the calls of concurrent threads run one after another on the GPU (for overlap,
// make one backend per thread or per device). Calls may come from any thread; each call makes
// its device current on the calling thread.
//
// Failures: MakeCudaBackend returns a Status (no driver, no such device, out of memory). Inside
// the ops, which return void, a CUDA or cuBLAS runtime failure (a lost device, device memory
// exhausted by the weight cache) aborts the process with a message naming the call; shapes are
// the caller's invariants, never request data, so nothing a client sends can reach that path.
//
// This header is plain C++ and includes no CUDA header; the implementation is cuda_backend.cu,
// built only when nvcc is found (MOEMESH_HAVE_CUDA), so callers include it under that macro.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "services/compute/backend.h"
#include "services/compute/device_experts.h"

namespace moemesh {

// Number of CUDA devices visible to this process; 0 when there is no GPU or no driver.
int CudaDeviceCount();

// The device's product name ("NVIDIA H200"), or "" when `device` does not exist.
std::string CudaDeviceName(int device);

// A backend on CUDA device `device` (0-based, as CUDA_VISIBLE_DEVICES renumbers them).
// INVALID_ARGUMENT for a device out of range, FAILED_PRECONDITION when no device or driver is
// present, INTERNAL for other CUDA or cuBLAS failures during setup.
[[nodiscard]] absl::StatusOr<std::unique_ptr<ComputeBackend>> MakeCudaBackend(int device);

// An expert group's weights uploaded to CUDA device `device` (services/compute/device_experts.h).
// FAILED_PRECONDITION without CUDA, a device or the room for the weights (the message gives
// the bytes needed and free).
[[nodiscard]] absl::StatusOr<std::unique_ptr<DeviceExperts>> MakeCudaExperts(
    int device, const std::vector<DeviceExpertWeights>& experts,
    const DeviceExpertsOptions& options);

}  // namespace moemesh
