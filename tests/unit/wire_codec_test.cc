// Tests of services/rpc/wire_codec: the encoders write exactly the bytes protobuf's serializer
// writes for the same messages, and the parsers agree with protobuf's parser on every input,
// canonical or not (unknown fields, unpacked repeated fields, repeated singular fields, fields
// out of order, truncations and random corruptions), whatever the chunks the bytes arrive in.
#include "services/rpc/wire_codec.h"

#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/escaping.h"
#include "gtest/gtest.h"
#include "moemesh/v1/expert_worker.pb.h"
#include "moemesh/v1/router.pb.h"
#include "services/rpc/tensor_proto.h"
#include "tests/test_util.h"

namespace moemesh {
namespace {

using ::moemesh::testing::AppendBytesField;
using ::moemesh::testing::AppendTag;
using ::moemesh::testing::AppendVarint;

std::string Flatten(const grpc::ByteBuffer& b) {
  ReceivedBytes bytes;
  EXPECT_TRUE(bytes.Reset(b).ok());
  std::string out;
  for (absl::string_view c : bytes.chunks()) out.append(c.data(), c.size());
  return out;
}

std::string Joined(const WireTensor& t) {
  std::string out;
  for (absl::string_view c : t.data) out.append(c.data(), c.size());
  EXPECT_EQ(out.size(), t.data_bytes);
  return out;
}

// `bytes` cut into pieces at random places (empty pieces included).
std::vector<absl::string_view> Cut(const std::string& bytes, std::mt19937& rng) {
  std::vector<absl::string_view> pieces;
  size_t pos = 0;
  while (pos < bytes.size()) {
    const size_t n = std::min<size_t>(bytes.size() - pos, rng() % 9 == 0 ? 0 : 1 + rng() % 7);
    pieces.emplace_back(bytes.data() + pos, n);
    pos += n;
  }
  if (rng() % 2) pieces.emplace_back();
  return pieces;
}

Tensor RandomTensor(std::vector<int64_t> shape, std::mt19937& rng) {
  Tensor t = Tensor::Zeros(std::move(shape));
  std::normal_distribution<float> d;
  for (int64_t i = 0; i < t.numel(); ++i) t.mutable_data()[i] = d(rng);
  return t;
}

void ExpectTensorEq(const WireTensor& got, const v1::Tensor& want) {
  EXPECT_EQ(got.dtype, static_cast<int32_t>(want.dtype()));
  EXPECT_EQ(got.shape, std::vector<int64_t>(want.shape().begin(), want.shape().end()));
  EXPECT_EQ(Joined(got), want.data());
}

// The parse of `bytes` (in random chunks) agrees with protobuf's: both accept with the same
// fields, or both reject.
void ExpectForwardAgrees(const std::string& bytes, std::mt19937& rng) {
  v1::ForwardRequest want;
  const bool want_ok = want.ParseFromString(bytes);
  const std::vector<absl::string_view> chunks = Cut(bytes, rng);
  WireForwardRequest got;
  const absl::Status s = ParseForwardRequest(chunks, &got);
  ASSERT_EQ(s.ok(), want_ok) << s << " for " << absl::BytesToHexString(bytes);
  if (!want_ok) {
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    return;
  }
  EXPECT_EQ(got.layer, want.layer());
  EXPECT_EQ(got.output_dtype, static_cast<int32_t>(want.output_dtype()));
  ExpectTensorEq(got.hidden, want.hidden());
}

void ExpectRunExpertsAgrees(const std::string& bytes, std::mt19937& rng) {
  v1::RunExpertsRequest want;
  const bool want_ok = want.ParseFromString(bytes);
  const std::vector<absl::string_view> chunks = Cut(bytes, rng);
  WireRunExpertsRequest got;
  const absl::Status s = ParseRunExpertsRequest(chunks, &got);
  ASSERT_EQ(s.ok(), want_ok) << s << " for " << absl::BytesToHexString(bytes);
  if (!want_ok) return;
  EXPECT_EQ(got.layer, want.layer());
  EXPECT_EQ(got.output_dtype, static_cast<int32_t>(want.output_dtype()));
  ExpectTensorEq(got.tokens, want.tokens());
  EXPECT_EQ(got.offsets, std::vector<int32_t>(want.offsets().begin(), want.offsets().end()));
  EXPECT_EQ(got.experts, std::vector<int32_t>(want.experts().begin(), want.experts().end()));
  ASSERT_EQ(got.weights.size(), static_cast<size_t>(want.weights_size()));
  for (size_t i = 0; i < got.weights.size(); ++i) {
    EXPECT_EQ(std::memcmp(&got.weights[i], &want.weights()[static_cast<int>(i)], 4), 0);
  }
}

void ExpectOutputAgrees(const std::string& bytes, std::mt19937& rng) {
  v1::RunExpertsResponse want;
  const bool want_ok = want.ParseFromString(bytes);
  const std::vector<absl::string_view> chunks = Cut(bytes, rng);
  WireTensor got;
  const absl::Status s = ParseOutputMessage(chunks, &got);
  ASSERT_EQ(s.ok(), want_ok) << s << " for " << absl::BytesToHexString(bytes);
  if (want_ok) ExpectTensorEq(got, want.output());
}

constexpr DType kWires[] = {DType::kF32, DType::kF16, DType::kBF16};

TEST(WireCodecTest, ForwardRequestIsProtobufsEncoding) {
  std::mt19937 rng(1);
  for (int iter = 0; iter < 60; ++iter) {
    const DType wire = kWires[iter % 3];
    const int64_t t = 1 + rng() % 20;
    const int64_t h = 1 + rng() % 70;
    const Tensor hidden = RandomTensor({t, h}, rng);
    const int32_t layer =
        iter % 7 == 0 ? 0 : (iter % 5 == 0 ? -3 : static_cast<int32_t>(rng() % 300));
    const int32_t out_dtype = iter % 4 == 0 ? 0 : 1 + iter % 3;
    v1::ForwardRequest want;
    want.set_layer(layer);
    TensorToProto(hidden, wire, want.mutable_hidden());
    want.set_output_dtype(static_cast<v1::DType>(out_dtype));
    const std::string bytes = Flatten(EncodeForwardRequest(layer, hidden, wire, out_dtype));
    ASSERT_EQ(bytes, want.SerializeAsString()) << "iteration " << iter;
    // And back, in random chunks: the same tensor as protobuf's decoder gives, bit for bit.
    WireForwardRequest parsed;
    ASSERT_TRUE(ParseForwardRequest(Cut(bytes, rng), &parsed).ok());
    absl::StatusOr<Tensor> got = TensorFromWire(parsed.hidden, "hidden", 2);
    absl::StatusOr<Tensor> expect = TensorFromProto(want.hidden(), "hidden", 2);
    ASSERT_TRUE(got.ok() && expect.ok()) << got.status();
    ASSERT_EQ(got->shape(), expect->shape());
    EXPECT_EQ(std::memcmp(got->data(), expect->data(), 4 * got->numel()), 0);
  }
}

TEST(WireCodecTest, RunExpertsRequestGathersRowsIntoProtobufsEncoding) {
  std::mt19937 rng(2);
  for (int iter = 0; iter < 60; ++iter) {
    const DType wire = kWires[iter % 3];
    const int64_t t = 1 + rng() % 24;
    const int64_t h = 1 + rng() % 40;
    const Tensor source = RandomTensor({t, h}, rng);
    // A subset of rows in any order (repeats allowed: the encoder must not care), or all.
    std::vector<int32_t> rows;
    if (iter % 4 != 0) {
      const int n = 1 + static_cast<int>(rng() % t);
      for (int i = 0; i < n; ++i) rows.push_back(static_cast<int32_t>(rng() % t));
    }
    const int64_t n = rows.empty() ? t : static_cast<int64_t>(rows.size());
    Tensor gathered = Tensor::Zeros({n, h});
    for (int64_t r = 0; r < n; ++r) {
      std::memcpy(gathered.mutable_row(r), source.row(rows.empty() ? r : rows[r]), 4 * h);
    }
    std::vector<int32_t> offsets{0}, experts;
    std::vector<float> weights;
    for (int64_t i = 0; i < n; ++i) {
      const int k = static_cast<int>(rng() % 4);
      for (int j = 0; j < k; ++j) {
        experts.push_back(j == 0 && iter % 3 == 0 ? -1 : static_cast<int32_t>(rng() % 256));
        weights.push_back(std::uniform_real_distribution<float>(-1, 1)(rng));
      }
      offsets.push_back(static_cast<int32_t>(experts.size()));
    }
    const int32_t layer = static_cast<int32_t>(rng() % 61);
    v1::RunExpertsRequest want;
    want.set_layer(layer);
    TensorToProto(gathered, wire, want.mutable_tokens());
    want.mutable_offsets()->Add(offsets.begin(), offsets.end());
    want.mutable_experts()->Add(experts.begin(), experts.end());
    want.mutable_weights()->Add(weights.begin(), weights.end());
    want.set_output_dtype(v1::DTYPE_BF16);
    const std::string bytes = Flatten(EncodeRunExpertsRequest(
        layer, TensorRows{&source, rows}, offsets, experts, weights, wire, v1::DTYPE_BF16));
    ASSERT_EQ(bytes, want.SerializeAsString()) << "iteration " << iter;
    ExpectRunExpertsAgrees(bytes, rng);
  }
}

TEST(WireCodecTest, OutputMessageIsProtobufsEncoding) {
  std::mt19937 rng(3);
  for (int iter = 0; iter < 30; ++iter) {
    const DType wire = kWires[iter % 3];
    const Tensor out = RandomTensor(
        {static_cast<int64_t>(1 + rng() % 9), static_cast<int64_t>(1 + rng() % 33)}, rng);
    v1::ForwardResponse want;
    TensorToProto(out, wire, want.mutable_output());
    const std::string bytes = Flatten(EncodeOutputMessage(out, wire));
    ASSERT_EQ(bytes, want.SerializeAsString());
    absl::StatusOr<Tensor> got = DecodeOutputMessage(EncodeOutputMessage(out, wire), "output");
    absl::StatusOr<Tensor> expect = TensorFromProto(want.output(), "output", 2);
    ASSERT_TRUE(got.ok() && expect.ok());
    EXPECT_EQ(std::memcmp(got->data(), expect->data(), 4 * got->numel()), 0);
  }
  // A tensor with no elements has no data field, as protobuf writes it.
  const Tensor empty = Tensor::Zeros({0, 8});
  v1::ForwardResponse want;
  TensorToProto(empty, DType::kBF16, want.mutable_output());
  EXPECT_EQ(Flatten(EncodeOutputMessage(empty, DType::kBF16)), want.SerializeAsString());
}

TEST(WireCodecTest, ElementsCutBetweenChunksDecodeWhole) {
  std::mt19937 rng(4);
  const Tensor x = RandomTensor({3, 5}, rng);
  for (DType wire : kWires) {
    const std::string bytes = Flatten(EncodeOutputMessage(x, wire));
    // Every split point, two and three pieces.
    for (size_t a = 0; a <= bytes.size(); ++a) {
      for (size_t b = a; b <= bytes.size(); b += 3) {
        const absl::string_view all(bytes);
        const std::vector<absl::string_view> pieces{all.substr(0, a), all.substr(a, b - a),
                                                    all.substr(b)};
        WireTensor t;
        ASSERT_TRUE(ParseOutputMessage(pieces, &t).ok());
        absl::StatusOr<Tensor> got = TensorFromWire(t, "x", 2);
        ASSERT_TRUE(got.ok()) << got.status();
        v1::ForwardResponse want;
        ASSERT_TRUE(want.ParseFromString(bytes));
        absl::StatusOr<Tensor> expect = TensorFromProto(want.output(), "x", 2);
        ASSERT_EQ(std::memcmp(got->data(), expect->data(), 4 * x.numel()), 0)
            << DTypeName(wire) << " cut at " << a << ", " << b;
      }
    }
  }
}

TEST(WireCodecTest, NonCanonicalEncodingsParseAsProtobufParsesThem) {
  std::mt19937 rng(5);
  std::vector<std::string> inputs;
  {
    // Fields out of order, an unpacked shape, unknown fields of every wire type (a group with
    // a nested group and fields inside), a repeated layer (the last one wins).
    std::string tensor;
    AppendBytesField(3, std::string(8, '\x3f'), &tensor);
    AppendTag(2, 0, &tensor);
    AppendVarint(2, &tensor);
    AppendTag(9, 1, &tensor);
    tensor.append(8, '\x01');
    AppendTag(2, 0, &tensor);
    AppendVarint(2, &tensor);
    AppendTag(1, 0, &tensor);
    AppendVarint(3, &tensor);
    std::string msg;
    AppendTag(3, 0, &msg);
    AppendVarint(3, &msg);
    AppendTag(1, 0, &msg);
    AppendVarint(7, &msg);
    AppendTag(15, 5, &msg);
    msg.append(4, '\x02');
    AppendTag(100, 3, &msg);
    AppendTag(7, 0, &msg);
    AppendVarint(1, &msg);
    AppendTag(8, 3, &msg);
    AppendTag(8, 4, &msg);
    AppendTag(100, 4, &msg);
    AppendBytesField(2, tensor, &msg);
    AppendTag(1, 0, &msg);
    AppendVarint(uint64_t{0xFFFFFFFF00000009}, &msg);  // int32: truncated to 9
    AppendBytesField(1000, "unknown", &msg);
    inputs.push_back(msg);
    // The message field twice: protobuf merges them (shape appended, data replaced).
    std::string again = msg;
    std::string second;
    AppendTag(2, 0, &second);
    AppendVarint(1, &second);
    AppendBytesField(3, std::string(4, '\x11'), &second);
    AppendBytesField(2, second, &again);
    inputs.push_back(again);
    // A known field with another wire type is an unknown field.
    std::string other = msg;
    AppendBytesField(1, "x", &other);
    AppendTag(2, 0, &other);
    AppendVarint(5, &other);
    inputs.push_back(other);
  }
  for (const std::string& in : inputs) {
    for (int rep = 0; rep < 20; ++rep) ExpectForwardAgrees(in, rng);
  }
  {
    // RunExperts: unpacked offsets, experts split over a packed and an unpacked run, weights
    // unpacked then packed, a negative expert id as a 10-byte varint.
    std::string tokens;
    AppendTag(1, 0, &tokens);
    AppendVarint(1, &tokens);
    AppendBytesField(2, std::string("\x02\x01", 2), &tokens);
    AppendBytesField(3, std::string(8, '\0'), &tokens);
    std::string msg;
    AppendBytesField(2, tokens, &msg);
    for (int o : {0, 1}) {
      AppendTag(3, 0, &msg);
      AppendVarint(o, &msg);
    }
    AppendBytesField(4, std::string(), &msg);
    AppendTag(4, 0, &msg);
    AppendVarint(uint64_t(-1), &msg);
    AppendTag(3, 0, &msg);
    AppendVarint(2, &msg);
    AppendBytesField(4, "\x05", &msg);
    AppendTag(5, 5, &msg);
    msg.append("\0\0\x80\x3f", 4);
    AppendBytesField(5, std::string("\0\0\0\x3f", 4), &msg);
    for (int rep = 0; rep < 20; ++rep) ExpectRunExpertsAgrees(msg, rng);
  }
}

TEST(WireCodecTest, MalformedBytesAreRejectedLikeProtobufRejectsThem) {
  std::mt19937 rng(6);
  const Tensor x = RandomTensor({2, 6}, rng);
  std::vector<int32_t> offsets{0, 2, 3}, experts{1, -1, 4};
  std::vector<float> weights{0.25f, 1.0f, 0.5f};
  const std::string forward = Flatten(EncodeForwardRequest(5, x, DType::kBF16, 3));
  const std::string run = Flatten(
      EncodeRunExpertsRequest(5, TensorRows{&x, {}}, offsets, experts, weights, DType::kF16, 1));
  const std::string output = Flatten(EncodeOutputMessage(x, DType::kF32));
  // Every truncation.
  for (size_t n = 0; n < forward.size(); ++n) ExpectForwardAgrees(forward.substr(0, n), rng);
  for (size_t n = 0; n < run.size(); ++n) ExpectRunExpertsAgrees(run.substr(0, n), rng);
  for (size_t n = 0; n < output.size(); ++n) ExpectOutputAgrees(output.substr(0, n), rng);
  // Random corruptions: bytes replaced, inserted, deleted; tags of fields 0, 6 and 7, end-group
  // tags without a start, overlong varints.
  const std::string specials[] = {std::string("\x00", 1),
                                  "\x02",
                                  "\x06",
                                  "\x07",
                                  "\x0c",
                                  "\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01",
                                  "\x8a\x80\x80\x80\x80\x00",
                                  "\x1b\x1c",
                                  "\x1b",
                                  "\x0b\x14"};
  for (int iter = 0; iter < 3000; ++iter) {
    std::string m = iter % 3 == 0 ? forward : (iter % 3 == 1 ? run : output);
    const int edits = 1 + static_cast<int>(rng() % 3);
    for (int e = 0; e < edits; ++e) {
      const size_t at = rng() % (m.size() + 1);
      switch (rng() % 4) {
        case 0:
          if (at < m.size()) m[at] = static_cast<char>(rng());
          break;
        case 1:
          m.insert(at, 1, static_cast<char>(rng()));
          break;
        case 2:
          if (at < m.size()) m.erase(at, 1 + rng() % 3);
          break;
        default:
          m.insert(at, specials[rng() % std::size(specials)]);
      }
    }
    if (iter % 3 == 0) ExpectForwardAgrees(m, rng);
    if (iter % 3 == 1) ExpectRunExpertsAgrees(m, rng);
    if (iter % 3 == 2) ExpectOutputAgrees(m, rng);
    if (HasFailure()) return;
  }
}

TEST(WireCodecTest, TensorFromWireValidatesLikeTensorFromProto) {
  struct Case {
    int32_t dtype;
    std::vector<int64_t> shape;
    size_t bytes;
    bool ok;
  };
  for (const Case& c :
       {Case{1, {2, 3}, 24, true}, Case{3, {2, 3}, 12, true}, Case{3, {2, 3}, 13, false},
        Case{0, {1}, 4, false}, Case{9, {1}, 4, false}, Case{1, {}, 0, false},
        Case{1, {1, 1, 1}, 4, false}, Case{1, {-1, 2}, 0, false},
        Case{1, {1 << 20, 1 << 20}, 0, false}, Case{1, {0, 5}, 0, true}}) {
    const std::string data(c.bytes, '\0');
    WireTensor w;
    w.dtype = c.dtype;
    w.shape = c.shape;
    w.data = {absl::string_view(data).substr(0, c.bytes / 2),
              absl::string_view(data).substr(c.bytes / 2)};
    w.data_bytes = c.bytes;
    v1::Tensor p;
    p.set_dtype(static_cast<v1::DType>(c.dtype));
    for (int64_t d : c.shape) p.add_shape(d);
    p.set_data(data);
    absl::StatusOr<Tensor> got = TensorFromWire(w, "t", 2);
    absl::StatusOr<Tensor> want = TensorFromProto(p, "t", 2);
    EXPECT_EQ(got.ok(), c.ok) << got.status();
    EXPECT_EQ(got.status(), want.status());
  }
}

}  // namespace
}  // namespace moemesh
