// The Gateway gRPC service: streaming Generate, Score and ModelInfo over a Scheduler.
//
// Requests go into the scheduler's continuous batch; its loop thread delivers tokens through
// callbacks that queue messages on the call's reactor, which writes them one at a time. A
// client that cancels or whose deadline passes leaves the batch at the next step (and a step
// whose every request is cancelled is cancelled at the router). Thread-safe.
#pragma once

#include <memory>
#include <optional>

#include "moemesh/v1/gateway.grpc.pb.h"
#include "services/engine/scheduler.h"
#include "services/metrics/metrics.h"
#include "services/text/tokenizer.h"

namespace moemesh::gateway {

class GatewayService final : public v1::Gateway::CallbackService {
 public:
  GatewayService(Scheduler* scheduler, const ModelConfig& config,
                 std::shared_ptr<const Tokenizer> tokenizer, Metrics* metrics);

  grpc::ServerWriteReactor<v1::GenerateResponse>* Generate(grpc::CallbackServerContext* ctx,
                                                           const v1::GenerateRequest* req) override;
  grpc::ServerUnaryReactor* Score(grpc::CallbackServerContext* ctx, const v1::ScoreRequest* req,
                                  v1::ScoreResponse* resp) override;
  grpc::ServerUnaryReactor* ModelInfo(grpc::CallbackServerContext* ctx,
                                      const v1::ModelInfoRequest* req,
                                      v1::ModelInfoResponse* resp) override;

 private:
  Scheduler* scheduler_;
  ModelConfig config_;
  std::shared_ptr<const Tokenizer> tokenizer_;
  Metrics* metrics_;
};

}  // namespace moemesh::gateway
