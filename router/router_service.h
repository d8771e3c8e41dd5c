// The Router gRPC service: Forward runs a MoeDispatcher over remote expert groups.
//
// Forward parses on the gRPC thread, hands gating to a ThreadPool, and finishes from the
// callback of the last expert group to answer, so no thread blocks on the network. The
// client's deadline and cancellation reach every worker call. Thread-safe.
#pragma once

#include <memory>
#include <vector>

#include "moemesh/v1/router.grpc.pb.h"
#include "services/common/thread_pool.h"
#include "services/metrics/metrics.h"
#include "services/moe/moe_layer.h"
#include "services/rpc/remote_expert_group.h"

namespace moemesh::router {

// Forward is a raw method: its messages are read and written by services/rpc/wire_codec.h,
// straight between gRPC's buffers and tensors (the bytes are still a v1::ForwardRequest and
// v1::ForwardResponse).
class RouterService final
    : public v1::Router::WithRawCallbackMethod_Forward<v1::Router::CallbackService> {
 public:
  RouterService(std::unique_ptr<MoeDispatcher> dispatcher,
                std::vector<std::shared_ptr<ReplicaSet>> groups, int threads, size_t max_queue,
                Metrics* metrics);

  grpc::ServerUnaryReactor* Forward(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* req,
                                    grpc::ByteBuffer* resp) override;
  grpc::ServerUnaryReactor* Topology(grpc::CallbackServerContext* ctx,
                                     const v1::TopologyRequest* req,
                                     v1::TopologyResponse* resp) override;

 private:
  std::unique_ptr<MoeDispatcher> dispatcher_;
  std::vector<std::shared_ptr<ReplicaSet>> groups_;
  Metrics* metrics_;
  ThreadPool pool_;
};

}  // namespace moemesh::router
