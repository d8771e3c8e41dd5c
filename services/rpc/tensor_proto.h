// Adapters between the core's plain C++ types and the moemesh.v1 protos, and between
// absl::Status and grpc::Status. The only place besides the services' gRPC glue that
// includes *.pb.h.
#pragma once

#include "absl/status/statusor.h"
#include "grpcpp/support/status.h"
#include "moemesh/v1/tensor.pb.h"
#include "services/tensor/tensor.h"

namespace moemesh {

// Largest gRPC message any moemesh service sends or accepts (activations of big batches).
inline constexpr int kMaxMessageBytes = 512 << 20;

absl::StatusOr<DType> DTypeFromProto(v1::DType d);
// The dtype a caller asks activations to come back in: F32 when unspecified; F32, F16 or
// BF16 otherwise (INVALID_ARGUMENT for anything else).
absl::StatusOr<DType> ActivationDTypeFromProto(v1::DType d);
// An activation wire dtype from a flag value: "f32" or "bf16".
absl::StatusOr<DType> ParseWireDType(absl::string_view flag);
v1::DType DTypeToProto(DType d);

// Encodes `t` as raw little-endian bytes of `wire` (F32 exact, BF16/F16 rounded).
void TensorToProto(const Tensor& t, DType wire, v1::Tensor* out);
// Decodes and validates: known dtype, non-negative shape of at most `max_rank` dimensions,
// and exactly product(shape) * sizeof(dtype) bytes. INVALID_ARGUMENT naming `what` otherwise.
absl::StatusOr<Tensor> TensorFromProto(const v1::Tensor& p, absl::string_view what,
                                       int max_rank = 4);

grpc::Status ToGrpcStatus(const absl::Status& s);
absl::Status FromGrpcStatus(const grpc::Status& s);

}  // namespace moemesh
