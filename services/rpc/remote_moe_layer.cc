#include "services/rpc/remote_moe_layer.h"

#include <algorithm>
#include <cstdio>
#include <map>
#include <thread>

#include "absl/random/random.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "services/rpc/server_host.h"
#include "services/rpc/tensor_proto.h"
#include "services/rpc/wire_codec.h"

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
      stub_(v1::Router::NewStub(channel_)),
      raw_(std::make_unique<grpc::GenericStub>(channel_)),
      timer_(std::make_unique<RetryTimer>()) {}

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

// Runs closures at given times on one thread; closures still pending at destruction run with
// `fired` false. Thread-safe.
class RemoteMoeLayer::RetryTimer {
 public:
  using Fn = std::function<void(bool fired)>;
  RetryTimer() : thread_([this] { Loop(); }) {}
  ~RetryTimer() {
    {
      absl::MutexLock lock(&mu_);
      stopping_ = true;
      cv_.Signal();
    }
    thread_.join();
  }
  void At(absl::Time when, Fn fn) {
    {
      absl::MutexLock lock(&mu_);
      if (!stopping_) {
        queue_.emplace(when, std::move(fn));
        cv_.Signal();
        return;
      }
    }
    fn(false);
  }

 private:
  void Loop() {
    std::multimap<absl::Time, Fn> rest;
    {
      absl::MutexLock lock(&mu_);
      while (!stopping_) {
        if (!queue_.empty() && queue_.begin()->first <= absl::Now()) {
          Fn fn = std::move(queue_.begin()->second);
          queue_.erase(queue_.begin());
          mu_.Unlock();
          fn(true);
          mu_.Lock();
          continue;
        }
        const absl::Time next = queue_.empty() ? absl::InfiniteFuture() : queue_.begin()->first;
        cv_.WaitWithDeadline(&mu_, next);
      }
      rest.swap(queue_);
    }
    for (auto& [_, fn] : rest) fn(false);
  }

  absl::Mutex mu_;
  absl::CondVar cv_;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::multimap<absl::Time, Fn> queue_ ABSL_GUARDED_BY(mu_);
  std::thread thread_;
};

// One Forward call and its attempts. The request is serialized once and reused by retries.
struct RemoteMoeLayer::Call {
  int layer = 0;
  grpc::ByteBuffer req;   // a v1::ForwardRequest, encoded once (wire_codec.h)
  grpc::ByteBuffer resp;  // a v1::ForwardResponse
  CallOptions opts;
  absl::Time deadline;
  MoeDone done;
  int attempt = 0;
  absl::Duration backoff;
  absl::BitGen rng;
  std::unique_ptr<grpc::ClientContext> ctx;
  int cancel_id = -1;
};

RemoteMoeLayer::~RemoteMoeLayer() = default;

absl::StatusOr<Tensor> RemoteMoeLayer::Forward(int layer, const Tensor& hidden,
                                               const CallOptions& opts) {
  return ForwardAndWait(layer, hidden, opts);
}

void RemoteMoeLayer::StartForward(int layer, Tensor hidden, const CallOptions& opts, MoeDone done) {
  auto call = std::make_shared<Call>();
  call->layer = layer;
  call->req = EncodeForwardRequest(layer, hidden, wire_, DTypeToProto(wire_));
  call->opts = opts;
  call->done = std::move(done);
  const absl::Time start = absl::Now();
  // A request without a deadline reaches here as InfiniteFuture, or, converted from gRPC's
  // "no deadline" (std::chrono::system_clock::time_point::max(), the year 2262), as a time
  // centuries away: both mean none was given.
  const bool none = opts.deadline - start > absl::Hours(24 * 365 * 100);
  call->deadline = none ? start + options_.default_deadline : opts.deadline;
  call->backoff = options_.initial_backoff;
  Attempt(std::move(call));
}

void RemoteMoeLayer::Attempt(std::shared_ptr<Call> call) {
  ++call->attempt;
  call->ctx = std::make_unique<grpc::ClientContext>();
  grpc::ClientContext* ctx = call->ctx.get();
  ctx->set_deadline(
      absl::ToChronoTime(std::min(call->deadline, absl::Now() + options_.attempt_timeout)));
  ctx->set_wait_for_ready(true);
  if (call->opts.cancel) call->cancel_id = call->opts.cancel->OnCancel([ctx] { ctx->TryCancel(); });
  call->resp.Clear();
  raw_->UnaryCall(ctx, "/moemesh.v1.Router/Forward", grpc::StubOptions(), &call->req, &call->resp,
                  [this, call](grpc::Status s) { Finished(call, std::move(s)); });
}

void RemoteMoeLayer::Finished(std::shared_ptr<Call> call, grpc::Status s) {
  if (call->opts.cancel) call->opts.cancel->RemoveCallback(call->cancel_id);
  if (s.ok()) {
    call->done(DecodeOutputMessage(call->resp, "router output"));
    return;
  }
  const absl::StatusCode code = static_cast<absl::StatusCode>(s.error_code());
  const bool cancelled = call->opts.cancel && call->opts.cancel->cancelled();
  // Sleep only if the next attempt still has a useful slice of time after the backoff.
  const absl::Duration sleep =
      absl::Uniform(call->rng, 0.5, 1.0) * std::min(call->backoff, options_.max_backoff);
  const bool time_left = absl::Now() + sleep < call->deadline;
  std::fprintf(stderr, "gateway: router %s: layer %d attempt %d: %s: %s\n", target_.c_str(),
               call->layer, call->attempt, absl::StatusCodeToString(code).c_str(),
               s.error_message().c_str());
  if (call->attempt < options_.max_attempts && Retryable(code, cancelled, time_left)) {
    retries_.fetch_add(1);
    call->backoff *= 2;
    timer_->At(absl::Now() + sleep, [this, call, s](bool fired) {
      if (fired) {
        Attempt(call);
      } else {
        call->done(absl::Status(absl::StatusCode::kCancelled, "router client shutting down"));
      }
    });
    return;
  }
  // The public message names no address: the router's own (which names workers) is logged.
  if (code == absl::StatusCode::kInvalidArgument || code == absl::StatusCode::kCancelled ||
      code == absl::StatusCode::kFailedPrecondition) {
    // Answers about the request itself; the router's messages for these name no worker.
    call->done(absl::Status(code, absl::StrCat("router: ", s.error_message())));
    return;
  }
  call->done(absl::Status(code, absl::StrCat("expert layer call failed after ", call->attempt,
                                             call->attempt == 1 ? " attempt" : " attempts", " (",
                                             absl::StatusCodeToString(code), ")")));
}

}  // namespace moemesh
