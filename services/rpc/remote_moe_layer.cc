#include "services/rpc/remote_moe_layer.h"

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "services/rpc/server_host.h"
#include "services/rpc/tensor_proto.h"

namespace moemesh {

RemoteMoeLayer::RemoteMoeLayer(const std::string& router_target, DType wire)
    : target_(router_target),
      wire_(wire),
      channel_(MakeChannel(router_target)),
      stub_(v1::Router::NewStub(channel_)) {}

bool RemoteMoeLayer::WaitForReady(absl::Duration timeout) {
  return channel_->WaitForConnected(absl::ToChronoTime(absl::Now() + timeout));
}

bool RemoteMoeLayer::IsReady(absl::Duration timeout) {
  auto health = grpc::health::v1::Health::NewStub(channel_);
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
  grpc::health::v1::HealthCheckRequest req;
  grpc::health::v1::HealthCheckResponse resp;
  return health->Check(&ctx, req, &resp).ok() &&
         resp.status() == grpc::health::v1::HealthCheckResponse::SERVING;
}

absl::StatusOr<v1::TopologyResponse> RemoteMoeLayer::Topology(absl::Duration timeout) {
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
  ctx.set_wait_for_ready(true);
  v1::TopologyRequest req;
  v1::TopologyResponse resp;
  const grpc::Status s = stub_->Topology(&ctx, req, &resp);
  if (!s.ok()) {
    return absl::Status(static_cast<absl::StatusCode>(s.error_code()),
                        absl::StrCat("router ", target_, ": Topology: ", s.error_message()));
  }
  return resp;
}

absl::StatusOr<Tensor> RemoteMoeLayer::Forward(int layer, const Tensor& hidden,
                                               const CallOptions& opts) {
  grpc::ClientContext ctx;
  if (opts.deadline != absl::InfiniteFuture()) ctx.set_deadline(absl::ToChronoTime(opts.deadline));
  int cancel_id = -1;
  if (opts.cancel) cancel_id = opts.cancel->OnCancel([&ctx] { ctx.TryCancel(); });
  v1::ForwardRequest req;
  req.set_layer(layer);
  TensorToProto(hidden, wire_, req.mutable_hidden());
  req.set_output_dtype(DTypeToProto(wire_));
  v1::ForwardResponse resp;
  const grpc::Status s = stub_->Forward(&ctx, req, &resp);
  if (opts.cancel) opts.cancel->RemoveCallback(cancel_id);
  if (!s.ok()) {
    return absl::Status(static_cast<absl::StatusCode>(s.error_code()),
                        absl::StrCat("router ", target_, ": ", s.error_message()));
  }
  return TensorFromProto(resp.output(), "router output", 2);
}

}  // namespace moemesh
