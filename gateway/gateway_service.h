// The Gateway gRPC service: streaming Generate, Score and ModelInfo over a Scheduler.
//
// Requests go into the scheduler's continuous batch; its loop thread delivers tokens through
// callbacks that queue messages on the call's reactor, which writes them one at a time. A
// client that cancels or whose deadline passes leaves the batch at the next step (and a step
// whose every request is cancelled is cancelled at the router). Score's per-position work
// (log-softmax, top-k, the log-probability of each given next token) runs on a small pool of
// its own, never on the scheduler's thread. Thread-safe.
#pragma once

#include <memory>
#include <optional>

#include "moemesh/v1/gateway.grpc.pb.h"
#include "services/common/thread_pool.h"
#include "services/engine/scheduler.h"
#include "services/metrics/metrics.h"
#include "services/model/tokenizer.h"

namespace moemesh::gateway {

class GatewayService final : public v1::Gateway::CallbackService {
 public:
  GatewayService(Scheduler* scheduler, const ModelConfig& config,
                 std::optional<Tokenizer> tokenizer, Metrics* metrics);
  // Waits for the scores being finished on the score pool. Stop the scheduler first.
  ~GatewayService();

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
  std::optional<Tokenizer> tokenizer_;
  Metrics* metrics_;
  // Turns Score logits into responses (log-softmax, top-k) off the scheduler's thread.
  std::shared_ptr<ThreadPool> score_pool_;  // shared with callbacks that may outlive us
};

}  // namespace moemesh::gateway
