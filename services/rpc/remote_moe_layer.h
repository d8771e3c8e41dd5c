// RemoteMoeLayer: the engine's MoeLayer implemented as a client of the router service.
//
// Forward blocks its caller (the gateway's engine thread, never a gRPC thread) until the
// router answers. The step's deadline becomes the call deadline, and cancelling the step's
// CancelFlag cancels the call. Thread-safe.
#pragma once

#include <memory>
#include <string>

#include "grpcpp/grpcpp.h"
#include "moemesh/v1/router.grpc.pb.h"
#include "services/moe/moe_layer.h"

namespace moemesh {

class RemoteMoeLayer final : public MoeLayer {
 public:
  RemoteMoeLayer(const std::string& router_target, DType wire);
  absl::StatusOr<Tensor> Forward(int layer, const Tensor& hidden, const CallOptions& opts) override;
  // Waits until the router's channel is ready or the timeout passes.
  bool WaitForReady(absl::Duration timeout);
  // True when the router answers its grpc.health.v1 check with SERVING within `timeout`.
  bool IsReady(absl::Duration timeout = absl::Seconds(1));
  // The router's Topology (groups, replicas, where shared experts run).
  [[nodiscard]] absl::StatusOr<v1::TopologyResponse> Topology(absl::Duration timeout);

 private:
  const std::string target_;
  const DType wire_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Router::Stub> stub_;
};

}  // namespace moemesh
