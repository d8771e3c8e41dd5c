// ExpertGroups that live in other processes.
//
// GrpcExpertGroup is one expert-worker endpoint: a host:port, or a target that resolves to
// several addresses (dns:///name:port, the Kubernetes headless Service of a group, or
// ipv4:a:p1,b:p2), which gRPC balances round-robin with health checking and whose calls gRPC
// itself retries on another address (retry policy: UNAVAILABLE, RESOURCE_EXHAUSTED).
//
// ReplicaSet spreads calls over the replicas of one group: it picks the ready replica with
// the fewest outstanding calls, and when a call fails with UNAVAILABLE, RESOURCE_EXHAUSTED
// (that replica is overloaded: the work moves), DEADLINE_EXCEEDED (per-attempt timeout) or a
// CANCELLED that the caller did not ask for (a worker draining on SIGTERM), it retries the
// call on another replica, so losing one replica loses no request that a survivor can serve.
// A multi-address replica may be tried up to `multi_address_attempts` times, each attempt a
// new round-robin pick. Replicas start not ready until they answered Describe (see
// SetReady), so a router can start while some replicas are down and serve degraded.
// Both use the gRPC callback API: no thread waits per call. Thread-safe.
#pragma once

#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/grpcpp.h"
#include "moemesh/v1/expert_worker.grpc.pb.h"
#include "services/moe/expert_group.h"

namespace moemesh {

class Metrics;

class GrpcExpertGroup final : public ExpertGroup {
 public:
  // `wire` is the dtype of activations sent and asked for (F32 exact, BF16 halves bytes).
  GrpcExpertGroup(std::string target, DType wire);
  std::string name() const override { return target_; }
  void RunExpertsAsync(std::shared_ptr<const ExpertBatch> batch, const CallOptions& opts,
                       ExpertDone done) override;
  // Blocking Describe with a deadline.
  [[nodiscard]] absl::StatusOr<v1::DescribeResponse> Describe(absl::Duration timeout);
  int64_t outstanding() const { return outstanding_.load(); }
  bool multi_address() const { return multi_address_; }

 private:
  const std::string target_;
  const bool multi_address_;
  const DType wire_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::ExpertWorker::Stub> stub_;  // Describe
  // RunExperts goes out as bytes that services/rpc/wire_codec.h encodes and decodes.
  std::unique_ptr<grpc::GenericStub> raw_;
  std::atomic<int64_t> outstanding_{0};
};

struct ReplicaSetOptions {
  absl::Duration attempt_timeout = absl::Seconds(30);  // per attempt, within the call deadline
  absl::Duration unhealthy_for = absl::Seconds(2);     // skip a failed replica this long
  int group_index = 0;                                 // for metrics labels
  int multi_address_attempts = 3;  // tries of one dns:/// or ipv4:a,b replica per call
};

class ReplicaSet final : public ExpertGroup {
 public:
  ReplicaSet(std::vector<std::shared_ptr<GrpcExpertGroup>> replicas, ReplicaSetOptions options,
             Metrics* metrics);
  std::string name() const override;
  void RunExpertsAsync(std::shared_ptr<const ExpertBatch> batch, const CallOptions& opts,
                       ExpertDone done) override;

  struct ReplicaState {
    std::string endpoint;
    int64_t outstanding;
    bool healthy;  // ready and not recently failed
    bool ready;    // answered Describe with the group's experts
  };
  std::vector<ReplicaState> State() const;
  // Marks replica `i` ready (it answered Describe with this group's experts) or not. Only
  // ready replicas are called. Replicas start ready.
  void SetReady(size_t i, bool ready);
  size_t size() const { return replicas_.size(); }
  const std::shared_ptr<GrpcExpertGroup>& replica(size_t i) const { return replicas_[i]; }
  int ready_count() const;

 private:
  struct Attempt;
  void Try(std::shared_ptr<Attempt> attempt);
  int Pick(const std::vector<int>& tries) const;

  std::vector<std::shared_ptr<GrpcExpertGroup>> replicas_;
  const ReplicaSetOptions options_;
  Metrics* metrics_;
  mutable absl::Mutex mu_;
  std::vector<absl::Time> unhealthy_until_ ABSL_GUARDED_BY(mu_);
  std::vector<bool> ready_ ABSL_GUARDED_BY(mu_);
  mutable size_t rotate_ ABSL_GUARDED_BY(mu_) = 0;  // where Pick's scan starts
};

}  // namespace moemesh
