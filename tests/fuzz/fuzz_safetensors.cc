// Fuzzes the safetensors header parser: any file either opens, with every tensor's byte
// range inside the mapping, or gives a Status. The input is written to a memfd and opened
// by path, as a checkpoint would be.
#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "services/model/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const int fd = memfd_create("fuzz.safetensors", 0);
  static const std::string path = "/proc/self/fd/" + std::to_string(fd);
  if (fd < 0) return 0;
  if (ftruncate(fd, 0) != 0 || pwrite(fd, data, size, 0) != static_cast<ssize_t>(size)) return 0;
  auto file = moemesh::SafetensorsFile::Open(path);
  if (!file.ok()) return 0;
  uint64_t sum = 0;
  for (const std::string& name : (*file)->Names()) {
    const moemesh::TensorInfo* info = (*file)->Find(name);
    if (info == nullptr) __builtin_trap();
    auto bytes = (*file)->Bytes(*info);
    if (bytes.size() != info->end - info->begin) __builtin_trap();
    for (uint8_t b : bytes) sum += b;  // every byte readable
  }
  return static_cast<int>(sum & 0);
}
