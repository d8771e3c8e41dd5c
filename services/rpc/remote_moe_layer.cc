#include "services/rpc/remote_moe_layer.h"

#include <algorithm>
#include <cstdio>

#include "absl/random/random.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "services/rpc/server_host.h"
#include "services/rpc/tensor_proto.h"

namespace moemesh {

namespace {

ChannelOptions RouterChannelOptions() {
  ChannelOptions o;
  o.retry_service = "moemesh.v1.Router";
  o.max_attempts = 3;
  o.wait_for_ready = true;
  return o;
}

}  // namespace

RemoteMoeLayer::RemoteMoeLayer(const std::string& router_target, DType wire,
                               RemoteMoeLayerOptions options)
    : target_(router_target),
      wire_(wire),
      options_(options),
      channel_(MakeChannel(router_target, RouterChannelOptions())),
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

bool RemoteMoeLayer::Retryable(absl::StatusCode code, bool step_cancelled, bool time_left) {
  if (step_cancelled || !time_left) return false;
  switch (code) {
    case absl::StatusCode::kUnavailable:
    case absl::StatusCode::kResourceExhausted:
    case absl::StatusCode::kAborted:
    case absl::StatusCode::kDeadlineExceeded:  // the attempt's, not the step's: time is left
    case absl::StatusCode::kCancelled:         // not ours: a router draining
      return true;
    default:
      return false;
  }
}

absl::StatusOr<Tensor> RemoteMoeLayer::Forward(int layer, const Tensor& hidden,
                                               const CallOptions& opts) {
  v1::ForwardRequest req;
  req.set_layer(layer);
  TensorToProto(hidden, wire_, req.mutable_hidden());
  req.set_output_dtype(DTypeToProto(wire_));
  const absl::Time start = absl::Now();
  // A request without a deadline reaches here as InfiniteFuture, or, converted from gRPC's
  // "no deadline" (std::chrono::system_clock::time_point::max(), the year 2262), as a time
  // centuries away: both mean none was given.
  const bool none = opts.deadline - start > absl::Hours(24 * 365 * 100);
  const absl::Time deadline = none ? start + options_.default_deadline : opts.deadline;
  absl::BitGen rng;
  absl::Duration backoff = options_.initial_backoff;
  grpc::Status s;
  int attempt = 0;
  for (;;) {
    ++attempt;
    grpc::ClientContext ctx;
    ctx.set_deadline(
        absl::ToChronoTime(std::min(deadline, absl::Now() + options_.attempt_timeout)));
    ctx.set_wait_for_ready(true);
    int cancel_id = -1;
    if (opts.cancel) cancel_id = opts.cancel->OnCancel([&ctx] { ctx.TryCancel(); });
    v1::ForwardResponse resp;
    s = stub_->Forward(&ctx, req, &resp);
    if (opts.cancel) opts.cancel->RemoveCallback(cancel_id);
    if (s.ok()) return TensorFromProto(resp.output(), "router output", 2);
    const absl::StatusCode code = static_cast<absl::StatusCode>(s.error_code());
    const bool cancelled = opts.cancel && opts.cancel->cancelled();
    // Sleep only if the next attempt still has a useful slice of time after the backoff.
    const absl::Duration sleep =
        absl::Uniform(rng, 0.5, 1.0) * std::min(backoff, options_.max_backoff);
    const bool time_left = absl::Now() + sleep < deadline;
    std::fprintf(stderr, "gateway: router %s: layer %d attempt %d: %s: %s\n", target_.c_str(),
                 layer, attempt, absl::StatusCodeToString(code).c_str(), s.error_message().c_str());
    if (attempt >= options_.max_attempts || !Retryable(code, cancelled, time_left)) break;
    retries_.fetch_add(1);
    absl::SleepFor(sleep);
    backoff *= 2;
  }
  // The public message names no address: the router's own (which names workers) is logged.
  const absl::StatusCode code = static_cast<absl::StatusCode>(s.error_code());
  if (code == absl::StatusCode::kInvalidArgument || code == absl::StatusCode::kCancelled ||
      code == absl::StatusCode::kFailedPrecondition) {
    // Answers about the request itself; the router's messages for these name no worker.
    return absl::Status(code, absl::StrCat("router: ", s.error_message()));
  }
  return absl::Status(code, absl::StrCat("expert layer call failed after ", attempt,
                                         attempt == 1 ? " attempt" : " attempts", " (",
                                         absl::StatusCodeToString(code), ")"));
}

}  // namespace moemesh
