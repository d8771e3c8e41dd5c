// Tensor: a dense, row-major F32 array with a shape, sharing its storage.
//
// Activations are F32 inside a process; weights of linear layers are Weight
// (services/tensor/weight.h), kept in their checkpoint's dtype. A Tensor either owns its buffer or
// is a view into memory kept alive by an owner (an mmap'd checkpoint file), so aligned F32 weights
// are used without a copy. Copying a Tensor copies the handle, not the data. Views over read-only
// mappings must not be written through mutable_data().
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "services/tensor/dtype.h"

namespace moemesh {

// "F32", "F16", "BF16", "F8_E4M3" (the safetensors spellings).
absl::StatusOr<DType> ParseDType(absl::string_view name);
absl::string_view DTypeName(DType dtype);
size_t DTypeSize(DType dtype);

float HalfToFloat(uint16_t h);
uint16_t FloatToHalf(float f);  // round to nearest even
float BF16ToFloat(uint16_t b);
uint16_t FloatToBF16(float f);  // round to nearest even
float F8E4M3ToFloat(uint8_t v);
uint8_t FloatToF8E4M3(float f);  // round to nearest even, saturating at ±448

// Converts `n` little-endian elements of `dtype` at `src` to F32 at `dst`.
void ConvertToF32(DType dtype, const void* src, size_t n, float* dst);
// Converts `n` F32 values to `dtype`, writing n * DTypeSize(dtype) bytes at `dst`.
void ConvertFromF32(DType dtype, const float* src, size_t n, void* dst);

class Tensor {
 public:
  Tensor() = default;
  // A zero-filled tensor that owns its storage.
  static Tensor Zeros(std::vector<int64_t> shape);
  // Storage of unspecified contents, for a caller that writes every element before reading
  // (decoding a message): it saves the pass that zeroing would make.
  static Tensor Uninitialized(std::vector<int64_t> shape);
  static Tensor FromVector(std::vector<int64_t> shape, std::vector<float> values);
  // A view of `data`, kept valid by `owner`.
  static Tensor View(std::vector<int64_t> shape, const float* data,
                     std::shared_ptr<const void> owner);

  const std::vector<int64_t>& shape() const { return shape_; }
  int rank() const { return static_cast<int>(shape_.size()); }
  int64_t dim(int i) const { return shape_[i < 0 ? i + rank() : i]; }
  int64_t numel() const;
  bool empty() const { return data_ == nullptr; }

  const float* data() const { return data_; }
  float* mutable_data() { return data_; }
  absl::Span<const float> span() const { return {data_, static_cast<size_t>(numel())}; }
  const float* row(int64_t r) const { return data_ + r * shape_.back(); }
  float* mutable_row(int64_t r) { return data_ + r * shape_.back(); }

  // Same storage, new shape with the same number of elements.
  Tensor Reshaped(std::vector<int64_t> shape) const;
  // An owned deep copy.
  Tensor Clone() const;
  std::string ShapeString() const;

 private:
  std::vector<int64_t> shape_;
  float* data_ = nullptr;
  std::shared_ptr<const void> owner_;
};

std::string ShapeToString(absl::Span<const int64_t> shape);

}  // namespace moemesh
