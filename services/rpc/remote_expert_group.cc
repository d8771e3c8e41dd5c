#include "services/rpc/remote_expert_group.h"

#include <algorithm>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "services/metrics/metrics.h"
#include "services/rpc/server_host.h"
#include "services/rpc/tensor_proto.h"
#include "services/rpc/wire_codec.h"

namespace moemesh {

GrpcExpertGroup::GrpcExpertGroup(std::string target, DType wire)
    : target_(std::move(target)),
      multi_address_(IsMultiAddressTarget(target_)),
      wire_(wire),
      channel_(MakeChannel(
          target_, ChannelOptions{.round_robin = multi_address_,
                                  .retry_service = multi_address_ ? "moemesh.v1.ExpertWorker" : "",
                                  .max_attempts = 3,
                                  .wait_for_ready = false})),
      stub_(v1::ExpertWorker::NewStub(channel_)),
      raw_(std::make_unique<grpc::GenericStub>(channel_)) {}

namespace {

// One RunExperts call in flight; owns the context and messages until the callback.
struct Call {
  grpc::ClientContext ctx;
  grpc::ByteBuffer req;   // a v1::RunExpertsRequest
  grpc::ByteBuffer resp;  // a v1::RunExpertsResponse
  std::shared_ptr<CancelFlag> cancel;
  int cancel_id = -1;
};

}  // namespace

void GrpcExpertGroup::RunExpertsAsync(std::shared_ptr<const ExpertBatch> batch,
                                      const CallOptions& opts, ExpertDone done) {
  auto call = std::make_shared<Call>();
  std::vector<int32_t> experts(batch->assignments.size());
  std::vector<float> weights(batch->assignments.size());
  for (size_t i = 0; i < batch->assignments.size(); ++i) {
    experts[i] = batch->assignments[i].expert;
    weights[i] = batch->assignments[i].weight;
  }
  // The batch's rows are gathered and converted to the wire dtype straight into the message.
  call->req = EncodeRunExpertsRequest(batch->layer, TensorRows{&batch->tokens, batch->rows},
                                      batch->offsets, experts, weights, wire_, DTypeToProto(wire_));
  if (opts.deadline != absl::InfiniteFuture())
    call->ctx.set_deadline(absl::ToChronoTime(opts.deadline));
  if (opts.cancel) {
    call->cancel = opts.cancel;
    std::weak_ptr<Call> weak = call;
    call->cancel_id = opts.cancel->OnCancel([weak] {
      if (auto c = weak.lock()) c->ctx.TryCancel();
    });
  }
  outstanding_.fetch_add(1);
  raw_->UnaryCall(&call->ctx, "/moemesh.v1.ExpertWorker/RunExperts", grpc::StubOptions(),
                  &call->req, &call->resp, [this, call, done = std::move(done)](grpc::Status s) {
                    outstanding_.fetch_sub(1);
                    if (call->cancel) call->cancel->RemoveCallback(call->cancel_id);
                    if (!s.ok()) {
                      done(absl::Status(static_cast<absl::StatusCode>(s.error_code()),
                                        absl::StrCat(target_, ": ", s.error_message())));
                      return;
                    }
                    done(DecodeOutputMessage(call->resp, "expert output"));
                  });
}

absl::StatusOr<v1::DescribeResponse> GrpcExpertGroup::Describe(absl::Duration timeout) {
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
  ctx.set_wait_for_ready(true);
  v1::DescribeRequest req;
  v1::DescribeResponse resp;
  grpc::Status s = stub_->Describe(&ctx, req, &resp);
  if (!s.ok())
    return absl::Status(static_cast<absl::StatusCode>(s.error_code()),
                        absl::StrCat(target_, ": Describe: ", s.error_message()));
  return resp;
}

struct ReplicaSet::Attempt {
  std::shared_ptr<const ExpertBatch> batch;
  CallOptions opts;
  ExpertDone done;
  std::vector<int> tries;
  absl::Status last;
};

ReplicaSet::ReplicaSet(std::vector<std::shared_ptr<GrpcExpertGroup>> replicas,
                       ReplicaSetOptions options, Metrics* metrics)
    : replicas_(std::move(replicas)),
      options_(options),
      metrics_(metrics),
      unhealthy_until_(replicas_.size(), absl::InfinitePast()),
      ready_(replicas_.size(), true) {}

void ReplicaSet::SetReady(size_t i, bool ready) {
  absl::MutexLock lock(&mu_);
  if (i < ready_.size()) ready_[i] = ready;
}

int ReplicaSet::ready_count() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int>(std::count(ready_.begin(), ready_.end(), true));
}

std::string ReplicaSet::name() const {
  std::vector<std::string> names;
  for (const auto& r : replicas_) names.push_back(r->name());
  return absl::StrCat("group ", options_.group_index, " [", absl::StrJoin(names, "|"), "]");
}

std::vector<ReplicaSet::ReplicaState> ReplicaSet::State() const {
  std::vector<ReplicaState> out;
  absl::MutexLock lock(&mu_);
  const absl::Time now = absl::Now();
  for (size_t i = 0; i < replicas_.size(); ++i) {
    out.push_back({replicas_[i]->name(), replicas_[i]->outstanding(),
                   ready_[i] && unhealthy_until_[i] <= now, ready_[i]});
  }
  return out;
}

int ReplicaSet::Pick(const std::vector<int>& tries) const {
  absl::MutexLock lock(&mu_);
  const absl::Time now = absl::Now();
  int best = -1;
  bool best_healthy = false;
  // Ties go round: the scan starts one replica later on every pick, so that equally loaded
  // replicas share the calls instead of the first one taking them all (with one caller, calls
  // almost always tie at zero outstanding).
  const size_t n = replicas_.size();
  const size_t start = n == 0 ? 0 : rotate_++ % n;
  for (size_t t = 0; t < n; ++t) {
    const size_t i = (start + t) % n;
    const int limit = replicas_[i]->multi_address() ? options_.multi_address_attempts : 1;
    if (tries[i] >= limit || !ready_[i]) continue;
    const bool healthy = unhealthy_until_[i] <= now;
    if (best < 0 || (healthy && !best_healthy) ||
        (healthy == best_healthy && replicas_[i]->outstanding() < replicas_[best]->outstanding())) {
      best = static_cast<int>(i);
      best_healthy = healthy;
    }
  }
  return best;
}

void ReplicaSet::RunExpertsAsync(std::shared_ptr<const ExpertBatch> batch, const CallOptions& opts,
                                 ExpertDone done) {
  auto a = std::make_shared<Attempt>();
  a->batch = std::move(batch);
  a->opts = opts;
  a->done = std::move(done);
  a->tries.assign(replicas_.size(), 0);
  Try(std::move(a));
}

void ReplicaSet::Try(std::shared_ptr<Attempt> a) {
  const int r = Pick(a->tries);
  if (r < 0) {
    // Overload stays overload: the caller may back off and retry.
    if (a->last.code() == absl::StatusCode::kResourceExhausted) {
      a->done(absl::ResourceExhaustedError(
          absl::StrCat("every replica of ", name(), " is overloaded: ", a->last.message())));
      return;
    }
    a->done(absl::UnavailableError(
        absl::StrCat("no ready replica of ", name(), " could serve the call",
                     a->last.ok() ? "" : "; last error: ", a->last.message())));
    return;
  }
  ++a->tries[r];
  CallOptions attempt = a->opts;
  const absl::Time attempt_deadline = absl::Now() + options_.attempt_timeout;
  if (attempt_deadline < attempt.deadline) attempt.deadline = attempt_deadline;
  replicas_[r]->RunExpertsAsync(a->batch, attempt, [this, a, r](absl::StatusOr<Tensor> result) {
    if (result.ok()) {
      absl::MutexLock lock(&mu_);
      unhealthy_until_[r] = absl::InfinitePast();
    }
    const absl::StatusCode code = result.status().code();
    const bool cancelled = a->opts.cancel && a->opts.cancel->cancelled();
    const bool time_left = absl::Now() < a->opts.deadline;
    // RunExperts has no side effects, so any transport-level failure is safe to retry. A
    // worker that is shutting down answers a call racing its drain with a bare CANCELLED;
    // that is the worker's cancellation, not ours, when our own flag is not set.
    // RESOURCE_EXHAUSTED: that replica's queue is full; another may have room.
    const bool retriable = code == absl::StatusCode::kUnavailable ||
                           code == absl::StatusCode::kResourceExhausted ||
                           (code == absl::StatusCode::kDeadlineExceeded && time_left) ||
                           (code == absl::StatusCode::kCancelled && !cancelled && time_left);
    if (result.ok() || !retriable || cancelled) {
      a->done(std::move(result));
      return;
    }
    // An overloaded replica is alive, and one address of a multi-address replica failing
    // says nothing of the others: neither is set aside.
    if (code != absl::StatusCode::kResourceExhausted && !replicas_[r]->multi_address()) {
      absl::MutexLock lock(&mu_);
      unhealthy_until_[r] = absl::Now() + options_.unhealthy_for;
    }
    a->last = result.status();
    if (metrics_ != nullptr) metrics_->CountRetry(options_.group_index);
    Try(a);
  });
}

}  // namespace moemesh
