#include "router/router_service.h"

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "services/rpc/service_main.h"
#include "services/rpc/tensor_proto.h"
#include "services/rpc/wire_codec.h"

namespace moemesh::router {

RouterService::RouterService(std::unique_ptr<MoeDispatcher> dispatcher,
                             std::vector<std::shared_ptr<ReplicaSet>> groups, int threads,
                             size_t max_queue, Metrics* metrics)
    : dispatcher_(std::move(dispatcher)),
      groups_(std::move(groups)),
      metrics_(metrics),
      pool_(threads, max_queue) {}

grpc::ServerUnaryReactor* RouterService::Forward(grpc::CallbackServerContext* ctx,
                                                 const grpc::ByteBuffer* req,
                                                 grpc::ByteBuffer* resp) {
  auto* reactor = new CancellableUnaryReactor();
  const absl::Time received = absl::Now();
  auto finish = [this, reactor, received](const absl::Status& s) {
    metrics_->CountRequest("Forward", s.code());
    metrics_->ObserveLatency("Forward", absl::ToDoubleSeconds(absl::Now() - received));
    reactor->Finish(ToGrpcStatus(s));
  };
  ReceivedBytes bytes;
  WireForwardRequest parsed;
  absl::Status s = bytes.Reset(*req);
  if (s.ok()) s = ParseForwardRequest(bytes.chunks(), &parsed);
  if (!s.ok()) {
    finish(s);
    return reactor;
  }
  auto hidden = TensorFromWire(parsed.hidden, "hidden", 2);
  if (!hidden.ok()) {
    finish(hidden.status());
    return reactor;
  }
  auto out_dtype_or = ActivationDTypeFromProto(static_cast<v1::DType>(parsed.output_dtype));
  if (!out_dtype_or.ok()) {
    finish(out_dtype_or.status());
    return reactor;
  }
  const DType out_dtype = *out_dtype_or;
  CallOptions opts;
  opts.deadline = absl::FromChrono(ctx->deadline());
  opts.cancel = reactor->cancel();
  const int layer = parsed.layer;
  const bool queued = pool_.TrySchedule(
      [this, layer, h = *std::move(hidden), opts, resp, out_dtype, finish]() mutable {
        if (opts.cancel->cancelled()) {
          finish(absl::CancelledError("cancelled before gating"));
          return;
        }
        dispatcher_->ForwardAsync(layer, std::move(h), opts,
                                  [this, layer, resp, out_dtype, finish](
                                      absl::StatusOr<Tensor> out, const DispatchStats& stats) {
                                    if (out.ok()) {
                                      metrics_->AddExpertTokens(layer, stats.expert_tokens);
                                      metrics_->AddTokenSends(stats.token_sends);
                                      *resp = EncodeOutputMessage(*out, out_dtype);
                                    }
                                    finish(out.status());
                                  });
      });
  if (!queued) finish(absl::ResourceExhaustedError("router queue is full"));
  metrics_->SetQueueDepth(static_cast<double>(pool_.queued()));
  return reactor;
}

grpc::ServerUnaryReactor* RouterService::Topology(grpc::CallbackServerContext* ctx,
                                                  const v1::TopologyRequest* req,
                                                  v1::TopologyResponse* resp) {
  resp->set_dispatches_shared_experts(dispatcher_->dispatches_shared());
  for (size_t g = 0; g < groups_.size(); ++g) {
    v1::GroupInfo* gi = resp->add_groups();
    gi->set_group(static_cast<int32_t>(g));
    for (const auto& r : groups_[g]->State()) {
      v1::ReplicaInfo* ri = gi->add_replicas();
      ri->set_endpoint(r.endpoint);
      ri->set_outstanding(r.outstanding);
      ri->set_healthy(r.healthy);
    }
  }
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

}  // namespace moemesh::router
