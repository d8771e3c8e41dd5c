#include "services/rpc/tensor_proto.h"

#include "absl/strings/str_cat.h"
#include "services/rpc/wire_codec.h"

namespace moemesh {

// wire_codec.h maps DType to and from these values without the generated enum.
static_assert(v1::DTYPE_F32 == 1 && v1::DTYPE_F16 == 2 && v1::DTYPE_BF16 == 3 &&
              v1::DTYPE_F8_E4M3 == 4);

absl::StatusOr<DType> DTypeFromProto(v1::DType d) { return DTypeFromWireValue(d); }

absl::StatusOr<DType> ActivationDTypeFromProto(v1::DType d) {
  if (d == v1::DTYPE_UNSPECIFIED) return DType::kF32;
  auto dtype = DTypeFromProto(d);
  if (!dtype.ok() || *dtype == DType::kF8E4M3) {
    return absl::InvalidArgumentError("output_dtype must be F32, F16 or BF16");
  }
  return *dtype;
}

absl::StatusOr<DType> ParseWireDType(absl::string_view flag) {
  if (flag == "f32") return DType::kF32;
  if (flag == "bf16") return DType::kBF16;
  return absl::InvalidArgumentError(
      absl::StrCat("--wire_dtype must be f32 or bf16, got '", flag, "'"));
}

v1::DType DTypeToProto(DType d) { return static_cast<v1::DType>(DTypeWireValue(d)); }

void TensorToProto(const Tensor& t, DType wire, v1::Tensor* out) {
  out->set_dtype(DTypeToProto(wire));
  out->clear_shape();
  for (int64_t d : t.shape()) out->add_shape(d);
  const size_t n = static_cast<size_t>(t.numel());
  std::string* data = out->mutable_data();
  // The zero-fill of resize() is one pass more than needed; libstdc++ offers no uninitialized
  // resize before C++23 (resize_and_overwrite).
  data->resize(n * DTypeSize(wire));
  if (n > 0) ConvertFromF32(wire, t.data(), n, data->data());
}

absl::StatusOr<Tensor> TensorFromProto(const v1::Tensor& p, absl::string_view what, int max_rank) {
  const absl::string_view data = p.data();
  return TensorFromParts(p.dtype(), absl::MakeConstSpan(p.shape().data(), p.shape_size()),
                         absl::MakeConstSpan(&data, 1), what, max_rank);
}

grpc::Status ToGrpcStatus(const absl::Status& s) {
  if (s.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}

absl::Status FromGrpcStatus(const grpc::Status& s) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
}

}  // namespace moemesh
