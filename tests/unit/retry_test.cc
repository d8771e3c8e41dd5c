// Retries that keep failures small (issue 9 §3), against scripted in-process gRPC servers:
//
// - RemoteMoeLayer (gateway → router) retries UNAVAILABLE and RESOURCE_EXHAUSTED (its
//   channel's gRPC retry policy first, then its own backed-off loop) until the router answers,
//   never retries INVALID_ARGUMENT, gives a silent router a per-attempt deadline and stops after
//   its attempts, and names no address in its errors.
// - ReplicaSet (router → workers) moves a call that one replica answers RESOURCE_EXHAUSTED
//   (overloaded) to another replica, and keeps the busy replica in rotation.
#include <atomic>
#include <deque>
#include <memory>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "moemesh/v1/expert_worker.grpc.pb.h"
#include "moemesh/v1/router.grpc.pb.h"
#include "services/rpc/remote_expert_group.h"
#include "services/rpc/remote_moe_layer.h"
#include "services/rpc/server_host.h"
#include "services/rpc/tensor_proto.h"

namespace moemesh {
namespace {

// A reactor that answers only when the client gives up (deadline or cancellation).
class SilentReactor final : public grpc::ServerUnaryReactor {
 public:
  void OnCancel() override { Finish(grpc::Status(grpc::StatusCode::CANCELLED, "gone")); }
  void OnDone() override { delete this; }
};

// Answers Forward with the scripted codes in order (then OK with the input echoed); code
// DEADLINE_EXCEEDED in the script means "never answer".
class ScriptedRouter final : public v1::Router::CallbackService {
 public:
  explicit ScriptedRouter(std::deque<grpc::StatusCode> script) : script_(std::move(script)) {}
  grpc::ServerUnaryReactor* Forward(grpc::CallbackServerContext* ctx, const v1::ForwardRequest* req,
                                    v1::ForwardResponse* resp) override {
    calls_.fetch_add(1);
    grpc::StatusCode code = grpc::StatusCode::OK;
    {
      absl::MutexLock lock(&mu_);
      if (!script_.empty()) {
        code = script_.front();
        script_.pop_front();
      }
    }
    if (code == grpc::StatusCode::DEADLINE_EXCEEDED) return new SilentReactor();
    grpc::ServerUnaryReactor* r = ctx->DefaultReactor();
    if (code == grpc::StatusCode::OK) *resp->mutable_output() = req->hidden();
    r->Finish(grpc::Status(code, "scripted failure from worker 10.1.2.3:5000"));
    return r;
  }
  int calls() const { return calls_.load(); }

 private:
  absl::Mutex mu_;
  std::deque<grpc::StatusCode> script_ ABSL_GUARDED_BY(mu_);
  std::atomic<int> calls_{0};
};

struct RouterFixture {
  explicit RouterFixture(std::deque<grpc::StatusCode> script) : service(std::move(script)) {
    auto h = ServerHost::Start(ServerHostOptions{}, {&service});
    EXPECT_TRUE(h.ok()) << h.status();
    host = *std::move(h);
  }
  ScriptedRouter service;
  std::unique_ptr<ServerHost> host;
};

RemoteMoeLayerOptions FastRetries() {
  RemoteMoeLayerOptions o;
  o.attempt_timeout = absl::Milliseconds(300);
  o.initial_backoff = absl::Milliseconds(5);
  o.max_backoff = absl::Milliseconds(20);
  o.max_attempts = 4;
  return o;
}

Tensor Hidden() {
  Tensor t = Tensor::Zeros({2, 4});
  for (int64_t i = 0; i < t.numel(); ++i) t.mutable_data()[i] = 0.25f * i;
  return t;
}

// Connects the layer's channel before a test starts its clock: the first attempt would otherwise
// include the TCP and HTTP/2 connect, which on a loaded machine can take longer than a short
// attempt timeout. Waiting for the channel sends no Forward, so the scripted router counts nothing.
void Connect(RemoteMoeLayer& layer) {
  ASSERT_TRUE(layer.WaitForReady(absl::Seconds(30))) << "router channel did not connect";
}

CallOptions Deadline(absl::Duration d) {
  CallOptions o;
  o.deadline = absl::Now() + d;
  return o;
}

TEST(RemoteMoeLayerRetryTest, TransientFailuresAreRetriedUntilTheRouterAnswers) {
  RouterFixture f({grpc::StatusCode::UNAVAILABLE, grpc::StatusCode::RESOURCE_EXHAUSTED});
  // The channel's own retry policy may back off up to 150 ms between the failures inside one
  // layer attempt; a 300 ms attempt timeout could then expire while the third call is being
  // answered and the layer would call a fourth time. Nothing here needs a short attempt.
  RemoteMoeLayerOptions o = FastRetries();
  o.attempt_timeout = absl::Seconds(2);
  RemoteMoeLayer layer(f.host->address(), DType::kF32, o);
  ASSERT_NO_FATAL_FAILURE(Connect(layer));
  auto out = layer.Forward(0, Hidden(), Deadline(absl::Seconds(60)));
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(out->shape(), Hidden().shape());
  EXPECT_EQ(out->data()[5], Hidden().data()[5]);
  // Both failures were retried (by the channel's gRPC retry policy, or the layer's own).
  EXPECT_EQ(f.service.calls(), 3);
}

TEST(RemoteMoeLayerRetryTest, BadRequestsAreNotRetried) {
  RouterFixture f({grpc::StatusCode::INVALID_ARGUMENT});
  RemoteMoeLayer layer(f.host->address(), DType::kF32, FastRetries());
  ASSERT_NO_FATAL_FAILURE(Connect(layer));
  auto out = layer.Forward(0, Hidden(), Deadline(absl::Seconds(60)));
  EXPECT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(f.service.calls(), 1);
}

TEST(RemoteMoeLayerRetryTest, ASilentRouterCostsBoundedAttemptsAndLeaksNoAddress) {
  RouterFixture f({grpc::StatusCode::DEADLINE_EXCEEDED, grpc::StatusCode::DEADLINE_EXCEEDED,
                   grpc::StatusCode::DEADLINE_EXCEEDED, grpc::StatusCode::DEADLINE_EXCEEDED,
                   grpc::StatusCode::DEADLINE_EXCEEDED});
  RemoteMoeLayer layer(f.host->address(), DType::kF32, FastRetries());
  ASSERT_NO_FATAL_FAILURE(Connect(
      layer));  // each of the four 300 ms attempts reaches the router, none spent connecting
  // No step deadline: the layer's default applies; the attempts end it first.
  auto out = layer.Forward(0, Hidden(), CallOptions{});
  EXPECT_EQ(out.status().code(), absl::StatusCode::kDeadlineExceeded) << out.status();
  EXPECT_EQ(f.service.calls(), 4);
  EXPECT_EQ(out.status().message().find("127.0.0.1"), absl::string_view::npos)
      << out.status().message();
  EXPECT_EQ(out.status().message().find("10.1.2.3"), absl::string_view::npos);
}

TEST(RemoteMoeLayerRetryTest, TheStepDeadlineEndsRetries) {
  RouterFixture f({grpc::StatusCode::DEADLINE_EXCEEDED, grpc::StatusCode::DEADLINE_EXCEEDED,
                   grpc::StatusCode::DEADLINE_EXCEEDED, grpc::StatusCode::DEADLINE_EXCEEDED});
  RemoteMoeLayerOptions o = FastRetries();
  o.attempt_timeout = absl::Seconds(30);
  RemoteMoeLayer layer(f.host->address(), DType::kF32, o);
  ASSERT_NO_FATAL_FAILURE(Connect(layer));
  // The step's deadline (2 s) is far shorter than the attempt timeout (30 s): the one attempt
  // ends with the step, and no retry follows although attempts are left.
  auto out = layer.Forward(0, Hidden(), Deadline(absl::Seconds(2)));
  EXPECT_EQ(out.status().code(), absl::StatusCode::kDeadlineExceeded) << out.status();
  EXPECT_EQ(f.service.calls(), 1);
}

// Answers RunExperts with a fixed code (OK: zeros of the right shape).
class ScriptedWorker final : public v1::ExpertWorker::CallbackService {
 public:
  explicit ScriptedWorker(grpc::StatusCode code) : code_(code) {}
  grpc::ServerUnaryReactor* RunExperts(grpc::CallbackServerContext* ctx,
                                       const v1::RunExpertsRequest* req,
                                       v1::RunExpertsResponse* resp) override {
    calls_.fetch_add(1);
    grpc::ServerUnaryReactor* r = ctx->DefaultReactor();
    if (code_ == grpc::StatusCode::OK) {
      TensorToProto(Tensor::Zeros({req->tokens().shape(0), req->tokens().shape(1)}), DType::kF32,
                    resp->mutable_output());
    }
    r->Finish(grpc::Status(code_, "scripted"));
    return r;
  }
  int calls() const { return calls_.load(); }

 private:
  const grpc::StatusCode code_;
  std::atomic<int> calls_{0};
};

absl::StatusOr<Tensor> RunOnce(ReplicaSet& set) {
  auto batch = std::make_shared<ExpertBatch>();
  batch->tokens = Tensor::Zeros({1, 4});
  batch->offsets = {0, 1};
  batch->assignments = {{0, 1.0f}};
  absl::Notification done;
  absl::StatusOr<Tensor> result;
  set.RunExpertsAsync(batch, Deadline(absl::Seconds(30)), [&](absl::StatusOr<Tensor> r) {
    result = std::move(r);
    done.Notify();
  });
  done.WaitForNotification();
  return result;
}

TEST(ReplicaSetRetryTest, OverloadOnOneReplicaMovesTheCallToAnother) {
  ScriptedWorker busy(grpc::StatusCode::RESOURCE_EXHAUSTED), idle(grpc::StatusCode::OK);
  auto busy_host = ServerHost::Start(ServerHostOptions{}, {&busy});
  auto idle_host = ServerHost::Start(ServerHostOptions{}, {&idle});
  ASSERT_TRUE(busy_host.ok() && idle_host.ok());
  ReplicaSet set({std::make_shared<GrpcExpertGroup>((*busy_host)->address(), DType::kF32),
                  std::make_shared<GrpcExpertGroup>((*idle_host)->address(), DType::kF32)},
                 ReplicaSetOptions{}, nullptr);
  for (int i = 0; i < 3; ++i) {
    auto out = RunOnce(set);
    ASSERT_TRUE(out.ok()) << out.status();
  }
  // Every call ended on the idle replica; the busy one stays in rotation (overloaded is not
  // dead), so ties still send it some first attempts.
  EXPECT_GE(busy.calls(), 1);
  EXPECT_LE(busy.calls(), 3);
  EXPECT_EQ(idle.calls(), 3);
  EXPECT_TRUE(set.State()[0].healthy);
}

TEST(ReplicaSetRetryTest, EquallyLoadedReplicasShareTheCalls) {
  ScriptedWorker a(grpc::StatusCode::OK), b(grpc::StatusCode::OK), c(grpc::StatusCode::OK);
  auto ha = ServerHost::Start(ServerHostOptions{}, {&a});
  auto hb = ServerHost::Start(ServerHostOptions{}, {&b});
  auto hc = ServerHost::Start(ServerHostOptions{}, {&c});
  ASSERT_TRUE(ha.ok() && hb.ok() && hc.ok());
  ReplicaSet set({std::make_shared<GrpcExpertGroup>((*ha)->address(), DType::kF32),
                  std::make_shared<GrpcExpertGroup>((*hb)->address(), DType::kF32),
                  std::make_shared<GrpcExpertGroup>((*hc)->address(), DType::kF32)},
                 ReplicaSetOptions{}, nullptr);
  // One call at a time: every pick is a tie at zero outstanding calls.
  for (int i = 0; i < 12; ++i) ASSERT_TRUE(RunOnce(set).ok());
  EXPECT_EQ(a.calls(), 4);
  EXPECT_EQ(b.calls(), 4);
  EXPECT_EQ(c.calls(), 4);
}

TEST(ReplicaSetRetryTest, EveryReplicaOverloadedIsResourceExhausted) {
  ScriptedWorker a(grpc::StatusCode::RESOURCE_EXHAUSTED), b(grpc::StatusCode::RESOURCE_EXHAUSTED);
  auto ha = ServerHost::Start(ServerHostOptions{}, {&a});
  auto hb = ServerHost::Start(ServerHostOptions{}, {&b});
  ASSERT_TRUE(ha.ok() && hb.ok());
  ReplicaSet set({std::make_shared<GrpcExpertGroup>((*ha)->address(), DType::kF32),
                  std::make_shared<GrpcExpertGroup>((*hb)->address(), DType::kF32)},
                 ReplicaSetOptions{}, nullptr);
  auto out = RunOnce(set);
  EXPECT_EQ(out.status().code(), absl::StatusCode::kResourceExhausted) << out.status();
}

TEST(ReplicaSetRetryTest, NotReadyReplicasAreNotCalled) {
  ScriptedWorker a(grpc::StatusCode::OK), b(grpc::StatusCode::OK);
  auto ha = ServerHost::Start(ServerHostOptions{}, {&a});
  auto hb = ServerHost::Start(ServerHostOptions{}, {&b});
  ASSERT_TRUE(ha.ok() && hb.ok());
  ReplicaSet set({std::make_shared<GrpcExpertGroup>((*ha)->address(), DType::kF32),
                  std::make_shared<GrpcExpertGroup>((*hb)->address(), DType::kF32)},
                 ReplicaSetOptions{}, nullptr);
  set.SetReady(0, false);
  ASSERT_TRUE(RunOnce(set).ok());
  EXPECT_EQ(a.calls(), 0);
  EXPECT_EQ(b.calls(), 1);
  EXPECT_FALSE(set.State()[0].ready);
  set.SetReady(1, false);
  EXPECT_EQ(RunOnce(set).status().code(), absl::StatusCode::kUnavailable);
}

TEST(ChannelConfigTest, MultiAddressTargetsAndServiceConfig) {
  EXPECT_TRUE(IsMultiAddressTarget("dns:///workers.g0:50051"));
  EXPECT_TRUE(IsMultiAddressTarget("ipv4:127.0.0.1:1,127.0.0.1:2"));
  EXPECT_FALSE(IsMultiAddressTarget("ipv4:127.0.0.1:1"));
  EXPECT_FALSE(IsMultiAddressTarget("127.0.0.1:1"));
  ChannelOptions o;
  o.round_robin = true;
  o.retry_service = "moemesh.v1.ExpertWorker";
  o.wait_for_ready = true;
  const std::string c = ChannelServiceConfig(o);
  EXPECT_NE(c.find("round_robin"), std::string::npos) << c;
  EXPECT_NE(c.find("retryPolicy"), std::string::npos) << c;
  EXPECT_NE(c.find("\"waitForReady\":true"), std::string::npos) << c;
  EXPECT_EQ(ChannelServiceConfig(ChannelOptions{}), "{}");
}

}  // namespace
}  // namespace moemesh
