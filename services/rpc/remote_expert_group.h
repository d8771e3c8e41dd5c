// ExpertGroups that live in other processes.
//
// GrpcExpertGroup is one expert-worker endpoint (a host:port, or a dns:/// name whose
// addresses gRPC balances round-robin). ReplicaSet spreads calls over several replicas of
// the same group: it picks the replica with the fewest outstanding calls, and when a call
// fails with UNAVAILABLE, DEADLINE_EXCEEDED (per-attempt timeout) or a CANCELLED that the
// caller did not ask for (a worker draining on SIGTERM) it retries the call on
// another replica, so losing one replica loses no request that a survivor can serve.
// Both use the gRPC callback API: no thread waits per call. Thread-safe.
#pragma once

#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
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

 private:
  const std::string target_;
  const DType wire_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::ExpertWorker::Stub> stub_;
  std::atomic<int64_t> outstanding_{0};
};

struct ReplicaSetOptions {
  absl::Duration attempt_timeout = absl::Seconds(30);  // per attempt, within the call deadline
  absl::Duration unhealthy_for = absl::Seconds(2);     // skip a failed replica this long
  int group_index = 0;                                 // for metrics labels
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
    bool healthy;
  };
  std::vector<ReplicaState> State() const;

 private:
  struct Attempt;
  void Try(std::shared_ptr<Attempt> attempt);
  int Pick(const std::vector<bool>& tried) const;

  std::vector<std::shared_ptr<GrpcExpertGroup>> replicas_;
  const ReplicaSetOptions options_;
  Metrics* metrics_;
  mutable absl::Mutex mu_;
  std::vector<absl::Time> unhealthy_until_ ABSL_GUARDED_BY(mu_);
};

}  // namespace moemesh
