// DType: the element types found in checkpoints, in memory and on the wire.
//
// Plain C++17 so that the CUDA backend can include it.
#pragma once

#include <cstddef>

namespace moemesh {

enum class DType { kF32, kF16, kBF16, kF8E4M3 };

// Bytes per element.
constexpr size_t DTypeBytes(DType dtype) {
  return dtype == DType::kF32 ? 4 : (dtype == DType::kF8E4M3 ? 1 : 2);
}

}  // namespace moemesh
