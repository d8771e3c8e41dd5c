// Finds the CUDA backend at run time: libmoemesh_cuda.so, built beside the binaries when nvcc
// is found, is dlopen'ed on the first call. Binaries therefore never link cuBLAS (whose large
// static TLS breaks threads with small stacks) unless a CUDA backend is actually used, and a
// build without CUDA answers "not built with CUDA".
#include <dlfcn.h>
#include <unistd.h>

#include <mutex>
#include <string>

#include "absl/strings/str_cat.h"
#include "services/compute/cuda/cuda_backend.h"

namespace moemesh {
namespace {

struct CudaLibrary {
  int (*device_count)() = nullptr;
  void (*device_name)(int, char*, int) = nullptr;
  ComputeBackend* (*make_backend)(int, int*, char*, int) = nullptr;
  DeviceExperts* (*make_experts)(int, const DeviceExpertWeights*, int, const DeviceExpertsOptions*,
                                 char*, int) = nullptr;
  std::string error;
};

const CudaLibrary& Library() {
  static const CudaLibrary* lib = [] {
    auto* l = new CudaLibrary();
#ifndef MOEMESH_HAVE_CUDA
    l->error = "moemesh was built without CUDA (nvcc was not found at configure time)";
#else
    // Beside the executable first (build/bin/), then the loader's search path.
    char exe[4096];
    const ssize_t n = ::readlink("/proc/self/exe", exe, sizeof(exe) - 1);
    std::string dir = n > 0 ? std::string(exe, n) : std::string();
    dir = dir.substr(0, dir.rfind('/'));
    void* h = ::dlopen((dir + "/libmoemesh_cuda.so").c_str(), RTLD_NOW | RTLD_LOCAL);
    if (h == nullptr) h = ::dlopen("libmoemesh_cuda.so", RTLD_NOW | RTLD_LOCAL);
    if (h == nullptr) {
      const char* e = ::dlerror();
      l->error = absl::StrCat("cannot load libmoemesh_cuda.so: ", e ? e : "unknown error");
      return l;
    }
    l->device_count = reinterpret_cast<int (*)()>(::dlsym(h, "moemesh_cuda_device_count"));
    l->device_name =
        reinterpret_cast<void (*)(int, char*, int)>(::dlsym(h, "moemesh_cuda_device_name"));
    l->make_backend = reinterpret_cast<ComputeBackend* (*)(int, int*, char*, int)>(
        ::dlsym(h, "moemesh_cuda_make_backend"));
    l->make_experts = reinterpret_cast<DeviceExperts* (*)(int, const DeviceExpertWeights*, int,
                                                          const DeviceExpertsOptions*, char*, int)>(
        ::dlsym(h, "moemesh_cuda_make_experts"));
    if (!l->device_count || !l->device_name || !l->make_backend || !l->make_experts) {
      l->error = "libmoemesh_cuda.so lacks its entry points";
      l->device_count = nullptr;
    }
#endif
    return l;
  }();
  return *lib;
}

}  // namespace

int CudaDeviceCount() {
  const CudaLibrary& l = Library();
  return l.device_count ? l.device_count() : 0;
}

std::string CudaDeviceName(int device) {
  const CudaLibrary& l = Library();
  if (!l.device_count) return "";
  char buf[256] = {0};
  l.device_name(device, buf, sizeof(buf));
  return buf;
}

absl::StatusOr<std::unique_ptr<ComputeBackend>> MakeCudaBackend(int device) {
  const CudaLibrary& l = Library();
  if (!l.device_count) return absl::FailedPreconditionError(l.error);
  int code = 0;
  char err[1024] = {0};
  ComputeBackend* b = l.make_backend(device, &code, err, sizeof(err));
  if (b == nullptr) return absl::Status(static_cast<absl::StatusCode>(code), err);
  return std::unique_ptr<ComputeBackend>(b);
}

}  // namespace moemesh

namespace moemesh {

absl::StatusOr<std::unique_ptr<DeviceExperts>> MakeCudaExperts(
    int device, const std::vector<DeviceExpertWeights>& experts,
    const DeviceExpertsOptions& options) {
  const CudaLibrary& l = Library();
  if (!l.device_count) return absl::FailedPreconditionError(l.error);
  char err[2048] = {0};
  DeviceExperts* d = l.make_experts(device, experts.data(), static_cast<int>(experts.size()),
                                    &options, err, sizeof(err));
  if (d == nullptr) return absl::FailedPreconditionError(err);
  return std::unique_ptr<DeviceExperts>(d);
}

}  // namespace moemesh
