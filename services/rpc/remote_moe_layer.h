// RemoteMoeLayer: the engine's MoeLayer implemented as a client of the router service.
//
// StartForward sends the call with gRPC's callback API and returns at once: no thread waits
// on the network, and two calls in flight together (the engine's two micro-batches) share one
// HTTP/2 channel without waiting for each other. `done` runs on a gRPC callback thread (or on
// the retry timer's thread after a backoff). Forward is StartForward plus a wait, for callers
// that have nothing else to do (never a gRPC thread). A router call has no side effects (sequences
// advance only when the whole step succeeds), so a failed call is retried: bounded in attempts,
// backed off exponentially with jitter, and always within the step's deadline. Retried are
// UNAVAILABLE (router restarting or draining, connection lost), RESOURCE_EXHAUSTED (router queue or
// every replica of a group overloaded), ABORTED, a per-attempt DEADLINE_EXCEEDED while the
// step still has time, and a CANCELLED the step did not ask for. Every attempt carries a
// deadline: the step's, capped by `attempt_timeout`, so a frozen router (SIGSTOP) costs a
// step at most one attempt timeout before the next try. Calls wait for the channel to be
// ready (wait-for-ready), so a router restart delays steps instead of failing them, and the
// channel itself has keepalive and a gRPC retry policy.
//
// Errors returned carry the gRPC code and a message without internal addresses (they may
// reach public clients); the full detail, router address included, goes to stderr.
// Cancelling the step's CancelFlag cancels the attempt in flight and stops retrying.
// Thread-safe.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/time/time.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/grpcpp.h"
#include "moemesh/v1/router.grpc.pb.h"
#include "services/moe/moe_layer.h"

namespace moemesh {

struct RemoteMoeLayerOptions {
  // Deadline of one attempt, within the step's.
  absl::Duration attempt_timeout = absl::Seconds(30);
  // Deadline of a step whose requests have none (every hop gets one).
  absl::Duration default_deadline = absl::Seconds(120);
  int max_attempts = 5;
  absl::Duration initial_backoff = absl::Milliseconds(50);
  absl::Duration max_backoff = absl::Seconds(2);
};

class RemoteMoeLayer final : public MoeLayer {
 public:
  RemoteMoeLayer(const std::string& router_target, DType wire,
                 RemoteMoeLayerOptions options = RemoteMoeLayerOptions());
  ~RemoteMoeLayer() override;
  absl::StatusOr<Tensor> Forward(int layer, const Tensor& hidden, const CallOptions& opts) override;
  void StartForward(int layer, Tensor hidden, const CallOptions& opts, MoeDone done) override;
  // Waits until the router's channel is ready or the timeout passes.
  bool WaitForReady(absl::Duration timeout);
  // True when the router answers its grpc.health.v1 check with SERVING within `timeout`.
  bool IsReady(absl::Duration timeout = absl::Seconds(1));
  // The router's Topology (groups, replicas, where shared experts run).
  [[nodiscard]] absl::StatusOr<v1::TopologyResponse> Topology(absl::Duration timeout);
  // Attempts that were retries, since start (for tests and metrics).
  int64_t retries() const { return retries_.load(); }

  // Whether a failed attempt with `code` may be retried; `step_cancelled`: the caller's flag.
  static bool Retryable(absl::StatusCode code, bool step_cancelled, bool time_left);

 private:
  struct Call;
  class RetryTimer;
  void Attempt(std::shared_ptr<Call> call);
  void Finished(std::shared_ptr<Call> call, grpc::Status s);

  const std::string target_;
  const DType wire_;
  const RemoteMoeLayerOptions options_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Router::Stub> stub_;  // Topology
  // Forward goes out as bytes that services/rpc/wire_codec.h encodes and decodes.
  std::unique_ptr<grpc::GenericStub> raw_;
  std::atomic<int64_t> retries_{0};
  std::unique_ptr<RetryTimer> timer_;  // runs retries after their backoff
};

}  // namespace moemesh
