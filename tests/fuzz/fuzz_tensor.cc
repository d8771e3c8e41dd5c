// Fuzzes the wire tensor decoder: a v1::Tensor (dtype, shape, raw bytes) becomes an F32
// tensor only when its bytes match its shape exactly; allocation never exceeds the input.
#include <cstddef>
#include <cstdint>

#include "moemesh/v1/tensor.pb.h"
#include "services/rpc/tensor_proto.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  moemesh::v1::Tensor t;
  if (!t.ParseFromArray(data, static_cast<int>(size))) return 0;
  auto decoded = moemesh::TensorFromProto(t, "fuzz", 4);
  if (decoded.ok() && decoded->numel() > 0) {
    // Round trip through every activation dtype.
    for (auto d : {moemesh::DType::kF32, moemesh::DType::kF16, moemesh::DType::kBF16}) {
      moemesh::v1::Tensor again;
      moemesh::TensorToProto(*decoded, d, &again);
      auto back = moemesh::TensorFromProto(again, "fuzz", 4);
      if (!back.ok() || back->shape() != decoded->shape()) __builtin_trap();
    }
  }
  (void)moemesh::ActivationDTypeFromProto(t.dtype());
  return 0;
}
