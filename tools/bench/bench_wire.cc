// bench_wire: what one hop of activations costs to put on the wire and take off it, through the
// generated protobuf classes (as the mesh did up to session 5) and through
// services/rpc/wire_codec.h (as it does now).
//
//   bench_wire [--iters 200] [--json out.json]
//
// For each shape (rows × hidden: decode and prefill batches of the bench model and of
// DeepSeek-R1) and wire dtype, one sender and one receiver side of a hop, single-threaded, on
// activations in cache as they are after a layer:
//   protobuf: send = [gather the group's rows into a new tensor] + TensorToProto + gRPC's
//             serializer into a byte buffer; receive = gRPC's parser + TensorFromProto;
//   codec:    send = EncodeRunExpertsRequest (gathering rows as it converts); receive =
//             ParseRunExpertsRequest + TensorFromWire.
// "half" rows: the router sends a group every other token of the step (several groups);
// "all": every token. The bytes are identical either way (wire_codec_test checks it).
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "grpcpp/impl/codegen/proto_utils.h"
#include "moemesh/v1/expert_worker.pb.h"
#include "nlohmann/json.hpp"
#include "services/rpc/tensor_proto.h"
#include "services/rpc/wire_codec.h"

ABSL_FLAG(int, iters, 200, "repetitions per case (best-of-3 medians of these)");
ABSL_FLAG(std::string, json, "", "write results as JSON here");

namespace {

using Clock = std::chrono::steady_clock;
using moemesh::DType;
using moemesh::Tensor;

// Microseconds per call of `fn`, the best of 3 runs of `iters` calls.
template <typename Fn>
double Micros(int iters, Fn fn) {
  double best = 1e30;
  for (int rep = 0; rep < 3; ++rep) {
    const auto t0 = Clock::now();
    for (int i = 0; i < iters; ++i) fn();
    best = std::min(best,
                    std::chrono::duration<double, std::micro>(Clock::now() - t0).count() / iters);
  }
  return best;
}

struct Row {
  int64_t rows, hidden;
  std::string subset, wire;
  double mb, proto_send, proto_recv, codec_send, codec_recv;
};

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const int iters = absl::GetFlag(FLAGS_iters);
  std::mt19937 rng(1);
  std::normal_distribution<float> dist;
  std::vector<Row> rows;
  std::printf("%6s %6s %5s %5s %8s | %10s %10s | %10s %10s | %6s\n", "rows", "hidden", "sent",
              "wire", "MB", "proto send", "proto recv", "codec send", "codec recv", "ratio");
  for (auto [t, h] :
       std::vector<std::pair<int64_t, int64_t>>{{16, 1024}, {512, 1024}, {16, 7168}, {256, 7168}}) {
    Tensor x = Tensor::Zeros({t, h});
    for (int64_t i = 0; i < x.numel(); ++i) x.mutable_data()[i] = dist(rng);
    for (bool half : {false, true}) {
      std::vector<int32_t> idx;
      if (half) {
        for (int32_t r = 0; r < t; r += 2) idx.push_back(r);
      }
      const int64_t n = half ? static_cast<int64_t>(idx.size()) : t;
      std::vector<int32_t> offsets{0}, experts;
      std::vector<float> weights;
      for (int64_t i = 0; i < n; ++i) {
        experts.insert(experts.end(), {1, 5});
        weights.insert(weights.end(), {0.6f, 0.4f});
        offsets.push_back(static_cast<int32_t>(experts.size()));
      }
      for (DType wire : {DType::kF32, DType::kBF16}) {
        const int it = std::max<int>(3, static_cast<int>(iters * 16 * 1024 / (t * h)));
        // protobuf classes.
        auto proto_message = [&] {
          moemesh::v1::RunExpertsRequest req;
          req.set_layer(3);
          Tensor sent = x;
          if (half) {
            sent = Tensor::Uninitialized({n, h});
            for (int64_t r = 0; r < n; ++r) {
              std::memcpy(sent.mutable_row(r), x.row(idx[r]), h * sizeof(float));
            }
          }
          moemesh::TensorToProto(sent, wire, req.mutable_tokens());
          req.mutable_offsets()->Add(offsets.begin(), offsets.end());
          req.mutable_experts()->Add(experts.begin(), experts.end());
          req.mutable_weights()->Add(weights.begin(), weights.end());
          req.set_output_dtype(moemesh::DTypeToProto(wire));
          grpc::ByteBuffer bb;
          bool own = false;
          (void)grpc::SerializationTraits<moemesh::v1::RunExpertsRequest>::Serialize(req, &bb,
                                                                                     &own);
          return bb;
        };
        const double proto_send = Micros(it, [&] { (void)proto_message(); });
        // The parser consumes its buffer: the messages are built first, untimed.
        std::vector<grpc::ByteBuffer> inbox;
        for (int i = 0; i < 3 * it; ++i) inbox.push_back(proto_message());
        size_t next = 0;
        const double proto_recv = Micros(it, [&] {
          moemesh::v1::RunExpertsRequest req;
          (void)grpc::SerializationTraits<moemesh::v1::RunExpertsRequest>::Deserialize(
              &inbox[next++], &req);
          auto tokens = moemesh::TensorFromProto(req.tokens(), "tokens", 2);
          if (!tokens.ok()) std::abort();
        });
        auto codec_message = [&] {
          return moemesh::EncodeRunExpertsRequest(3, moemesh::TensorRows{&x, idx}, offsets, experts,
                                                  weights, wire, moemesh::DTypeToProto(wire));
        };
        const double codec_send = Micros(it, [&] { (void)codec_message(); });
        const grpc::ByteBuffer message = codec_message();
        const double codec_recv = Micros(it, [&] {
          moemesh::ReceivedBytes bytes;
          if (!bytes.Reset(message).ok()) std::abort();
          moemesh::WireRunExpertsRequest req;
          if (!moemesh::ParseRunExpertsRequest(bytes.chunks(), &req).ok()) std::abort();
          auto tokens = moemesh::TensorFromWire(req.tokens, "tokens", 2);
          if (!tokens.ok()) std::abort();
        });
        Row r{t,
              h,
              half ? "half" : "all",
              std::string(moemesh::DTypeName(wire)),
              static_cast<double>(message.Length()) / 1e6,
              proto_send,
              proto_recv,
              codec_send,
              codec_recv};
        std::printf("%6ld %6ld %5s %5s %8.3f | %8.1fus %8.1fus | %8.1fus %8.1fus | %5.2fx\n",
                    static_cast<long>(r.rows), static_cast<long>(r.hidden), r.subset.c_str(),
                    r.wire.c_str(), r.mb, r.proto_send, r.proto_recv, r.codec_send, r.codec_recv,
                    (r.proto_send + r.proto_recv) / (r.codec_send + r.codec_recv));
        rows.push_back(r);
      }
    }
  }
  if (const std::string path = absl::GetFlag(FLAGS_json); !path.empty()) {
    nlohmann::json j = nlohmann::json::array();
    for (const Row& r : rows) {
      j.push_back({{"rows", r.rows},
                   {"hidden", r.hidden},
                   {"sent", r.subset},
                   {"wire", r.wire},
                   {"message_mb", r.mb},
                   {"protobuf_send_us", r.proto_send},
                   {"protobuf_receive_us", r.proto_recv},
                   {"codec_send_us", r.codec_send},
                   {"codec_receive_us", r.codec_recv}});
    }
    std::ofstream(path) << j.dump(2) << "\n";
  }
  return 0;
}
