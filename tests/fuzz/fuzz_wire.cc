// Fuzzes services/rpc/wire_codec's parsers differentially against protobuf's: on any bytes,
// cut into chunks anywhere, a parser must accept exactly when protobuf's parser accepts the
// same message type, and then yield the same fields. Accepted tensors must decode as
// TensorFromProto decodes them, bit for bit, and accepted requests must re-encode to bytes
// that protobuf reads back as the same message.
//
// Input: byte 0 picks the message type, byte 1 seeds where the chunks are cut, the rest is
// the message.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "moemesh/v1/expert_worker.pb.h"
#include "moemesh/v1/router.pb.h"
#include "services/rpc/tensor_proto.h"
#include "services/rpc/wire_codec.h"

namespace {

using moemesh::WireTensor;

void Check(bool ok) {
  if (!ok) __builtin_trap();
}

std::string Joined(const WireTensor& t) {
  std::string out;
  for (absl::string_view c : t.data) out.append(c.data(), c.size());
  return out;
}

void SameTensor(const WireTensor& got, const moemesh::v1::Tensor& want) {
  Check(got.dtype == static_cast<int32_t>(want.dtype()));
  Check(got.shape == std::vector<int64_t>(want.shape().begin(), want.shape().end()));
  Check(Joined(got) == want.data() && got.data_bytes == want.data().size());
  absl::StatusOr<moemesh::Tensor> a = moemesh::TensorFromWire(got, "t", 4);
  absl::StatusOr<moemesh::Tensor> b = moemesh::TensorFromProto(want, "t", 4);
  Check(a.status() == b.status());
  if (a.ok()) {
    Check(a->shape() == b->shape());
    Check(a->numel() == 0 || std::memcmp(a->data(), b->data(), 4 * a->numel()) == 0);
  }
}

std::string Flatten(const grpc::ByteBuffer& b) {
  moemesh::ReceivedBytes bytes;
  Check(bytes.Reset(b).ok());
  std::string out;
  for (absl::string_view c : bytes.chunks()) out.append(c.data(), c.size());
  return out;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 2) return 0;
  const int kind = data[0] % 3;
  uint32_t seed = data[1] * 2654435761u + 1;
  const std::string msg(reinterpret_cast<const char*>(data + 2), size - 2);
  std::vector<absl::string_view> chunks;
  for (size_t pos = 0; pos < msg.size();) {
    seed = seed * 1103515245u + 12345u;
    const size_t n = std::min<size_t>(msg.size() - pos, (seed >> 16) % 13);
    chunks.emplace_back(msg.data() + pos, n);
    pos += n;
  }
  if (kind == 0) {
    moemesh::v1::ForwardRequest want;
    const bool want_ok = want.ParseFromString(msg);
    moemesh::WireForwardRequest got;
    Check(moemesh::ParseForwardRequest(chunks, &got).ok() == want_ok);
    if (!want_ok) return 0;
    Check(got.layer == want.layer());
    Check(got.output_dtype == static_cast<int32_t>(want.output_dtype()));
    SameTensor(got.hidden, want.hidden());
  } else if (kind == 1) {
    moemesh::v1::RunExpertsRequest want;
    const bool want_ok = want.ParseFromString(msg);
    moemesh::WireRunExpertsRequest got;
    Check(moemesh::ParseRunExpertsRequest(chunks, &got).ok() == want_ok);
    if (!want_ok) return 0;
    Check(got.layer == want.layer());
    Check(got.output_dtype == static_cast<int32_t>(want.output_dtype()));
    SameTensor(got.tokens, want.tokens());
    Check(got.offsets == std::vector<int32_t>(want.offsets().begin(), want.offsets().end()));
    Check(got.experts == std::vector<int32_t>(want.experts().begin(), want.experts().end()));
    Check(got.weights.size() == static_cast<size_t>(want.weights_size()));
    Check(got.weights.empty() ||
          std::memcmp(got.weights.data(), want.weights().data(), 4 * got.weights.size()) == 0);
    // A valid request re-encodes to what protobuf serializes from the decoded message.
    absl::StatusOr<moemesh::Tensor> tokens = moemesh::TensorFromWire(got.tokens, "tokens", 2);
    if (tokens.ok() && tokens->numel() > 0 && got.tokens.dtype == moemesh::v1::DTYPE_F32) {
      moemesh::v1::RunExpertsRequest again = want;
      again.DiscardUnknownFields();
      again.clear_tokens();
      moemesh::TensorToProto(*tokens, moemesh::DType::kF32, again.mutable_tokens());
      const std::string bytes = Flatten(moemesh::EncodeRunExpertsRequest(
          got.layer, moemesh::TensorRows{&*tokens, {}}, got.offsets, got.experts, got.weights,
          moemesh::DType::kF32, got.output_dtype));
      Check(bytes == again.SerializeAsString());
    }
  } else {
    moemesh::v1::ForwardResponse want;
    const bool want_ok = want.ParseFromString(msg);
    WireTensor got;
    Check(moemesh::ParseOutputMessage(chunks, &got).ok() == want_ok);
    if (want_ok) SameTensor(got, want.output());
  }
  return 0;
}
