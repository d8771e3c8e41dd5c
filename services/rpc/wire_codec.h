// The activation-carrying messages of the mesh, encoded and decoded straight between tensor
// buffers and gRPC byte buffers, without protobuf message objects in between.
//
// Four messages carry every activation across the mesh: the router's ForwardRequest and
// ForwardResponse, and the worker's RunExpertsRequest and RunExpertsResponse
// (protos/moemesh/v1). Going through the generated classes touched each activation row five
// times per hop: converted into a zero-filled std::string, copied again by the serializer into
// gRPC's buffer, and on the far side copied out of gRPC's slices by the parser and converted
// once more. Here each row is touched once on each side: the encoder converts F32 rows (gathered
// by index where the caller wants a subset) directly into the one slice the message goes out in,
// and the decoder converts from gRPC's received slices directly into the F32 tensor.
//
// The bytes are exactly the protobuf encoding of the same messages: the encoder writes what
// protobuf's serializer writes (same field order, defaults omitted, repeated scalars packed),
// and the decoder accepts every encoding protobuf's parser accepts, with its semantics (fields
// in any order, unknown fields skipped, repeated scalars packed or not, a repeated singular
// field's last value winning, a repeated message field merged) and rejects what it rejects. So
// clients written against the .proto files (grpcio, grpcurl, other languages) are unaffected.
// tests/unit/wire_codec_test.cc checks both directions against protobuf; fuzz_wire compares
// the decoder with protobuf's parser on arbitrary bytes split at arbitrary points.
//
// The parsed forms point into the chunks they were parsed from: keep those alive (a
// ReceivedBytes, or the caller's own buffers) while using them. Pure functions; thread-safe.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "grpcpp/support/byte_buffer.h"
#include "grpcpp/support/slice.h"
#include "services/tensor/tensor.h"

namespace moemesh {

// DType as the values of the v1::DType enum (protos/moemesh/v1/tensor.proto: 1 F32, 2 F16,
// 3 BF16, 4 F8_E4M3); INVALID_ARGUMENT "unknown dtype N" for any other value.
[[nodiscard]] absl::StatusOr<DType> DTypeFromWireValue(int32_t value);
int32_t DTypeWireValue(DType dtype);

// A v1::Tensor as it arrived: its dtype (the raw enum value), shape, and data bytes, in pieces
// that point into the received chunks.
struct WireTensor {
  int32_t dtype = 0;
  std::vector<int64_t> shape;
  std::vector<absl::string_view> data;  // concatenated in order: the `data` field
  size_t data_bytes = 0;
};

// v1::ForwardRequest.
struct WireForwardRequest {
  int32_t layer = 0;
  WireTensor hidden;
  int32_t output_dtype = 0;
};

// v1::RunExpertsRequest.
struct WireRunExpertsRequest {
  int32_t layer = 0;
  WireTensor tokens;
  std::vector<int32_t> offsets;
  std::vector<int32_t> experts;
  std::vector<float> weights;
  int32_t output_dtype = 0;
};

// Parsers of the protobuf encoding split into `chunks` (a message's bytes, in order, cut
// anywhere). INVALID_ARGUMENT when protobuf's parser would reject the bytes.
[[nodiscard]] absl::Status ParseForwardRequest(absl::Span<const absl::string_view> chunks,
                                               WireForwardRequest* out);
[[nodiscard]] absl::Status ParseRunExpertsRequest(absl::Span<const absl::string_view> chunks,
                                                  WireRunExpertsRequest* out);
// v1::ForwardResponse and v1::RunExpertsResponse: both are { Tensor output = 1; }.
[[nodiscard]] absl::Status ParseOutputMessage(absl::Span<const absl::string_view> chunks,
                                              WireTensor* out);

// Decodes and validates as TensorFromProto does (known dtype, rank in [1, max_rank],
// non-negative dimensions, exactly product(shape) * sizeof(dtype) bytes), converting each
// element once, from the pieces into the new tensor.
[[nodiscard]] absl::StatusOr<Tensor> TensorFromWire(const WireTensor& t, absl::string_view what,
                                                    int max_rank);
// The same from a v1::Tensor's fields: shape and one contiguous data string.
[[nodiscard]] absl::StatusOr<Tensor> TensorFromParts(int32_t dtype, absl::Span<const int64_t> shape,
                                                     absl::Span<const absl::string_view> data,
                                                     absl::string_view what, int max_rank);

// Rows of an F32 tensor to put in a message: all of `source`'s rows in order when `rows` is
// empty, else source.row(rows[0]), source.row(rows[1]), ... (the gather happens while encoding).
struct TensorRows {
  const Tensor* source = nullptr;  // [n, width] f32, or any rank when `rows` is empty
  absl::Span<const int32_t> rows;
};

// Encoders: one slice holding the message's protobuf encoding, the activations converted to
// `wire` (F32 exact, F16/BF16 rounded to nearest even) on the way in.
[[nodiscard]] grpc::ByteBuffer EncodeForwardRequest(int32_t layer, const Tensor& hidden, DType wire,
                                                    int32_t output_dtype);
[[nodiscard]] grpc::ByteBuffer EncodeRunExpertsRequest(int32_t layer, TensorRows tokens,
                                                       absl::Span<const int32_t> offsets,
                                                       absl::Span<const int32_t> experts,
                                                       absl::Span<const float> weights, DType wire,
                                                       int32_t output_dtype);
[[nodiscard]] grpc::ByteBuffer EncodeOutputMessage(const Tensor& output, DType wire);

// A received ForwardResponse or RunExpertsResponse, parsed and decoded (TensorFromWire).
[[nodiscard]] absl::StatusOr<Tensor> DecodeOutputMessage(const grpc::ByteBuffer& message,
                                                         absl::string_view what);

// A received message's bytes, referenced (not copied) from gRPC's slices, as parser chunks.
// Keeps the slices alive for as long as it lives.
class ReceivedBytes {
 public:
  // INVALID_ARGUMENT if the buffer cannot be read (never for a buffer gRPC delivered).
  [[nodiscard]] absl::Status Reset(const grpc::ByteBuffer& buffer);
  absl::Span<const absl::string_view> chunks() const { return views_; }

 private:
  std::vector<grpc::Slice> slices_;
  std::vector<absl::string_view> views_;
};

}  // namespace moemesh
