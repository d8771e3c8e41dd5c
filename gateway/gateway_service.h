// The Gateway gRPC service: streaming Generate, Score, ModelInfo, Tokenize and Detokenize over a
// Scheduler.
//
// Text work (tokenizing a prompt, rendering a chat template) runs on the service's own small
// thread pool, never on a gRPC thread; a full pool answers RESOURCE_EXHAUSTED. Generated text
// streams through a TextStream (valid UTF-8, special tokens skipped, stop strings cut out); a
// stop string ends the request at once and frees its place in the batch.
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
#include <string>
#include <vector>

#include "gateway/api_keys.h"
#include "gateway/text_generator.h"
#include "moemesh/v1/gateway.grpc.pb.h"
#include "services/common/thread_pool.h"
#include "services/engine/scheduler.h"
#include "services/metrics/metrics.h"

namespace moemesh::gateway {

class GatewayService final : public v1::Gateway::CallbackService {
 public:
  GatewayService(Scheduler* scheduler, const ModelConfig& config, TextGenerator* generator,
                 Metrics* metrics, const ApiKeys* keys = nullptr);
  // Waits for the scores being finished on the score pool. Stop the scheduler first.
  ~GatewayService();

  grpc::ServerWriteReactor<v1::GenerateResponse>* Generate(grpc::CallbackServerContext* ctx,
                                                           const v1::GenerateRequest* req) override;
  grpc::ServerUnaryReactor* Score(grpc::CallbackServerContext* ctx, const v1::ScoreRequest* req,
                                  v1::ScoreResponse* resp) override;
  grpc::ServerUnaryReactor* ModelInfo(grpc::CallbackServerContext* ctx,
                                      const v1::ModelInfoRequest* req,
                                      v1::ModelInfoResponse* resp) override;
  grpc::ServerUnaryReactor* Tokenize(grpc::CallbackServerContext* ctx,
                                     const v1::TokenizeRequest* req,
                                     v1::TokenizeResponse* resp) override;
  grpc::ServerUnaryReactor* Detokenize(grpc::CallbackServerContext* ctx,
                                       const v1::DetokenizeRequest* req,
                                       v1::DetokenizeResponse* resp) override;

 private:
  // True when no keys are configured or the call carries a valid one.
  bool Authorized(grpc::CallbackServerContext* ctx) const;

  Scheduler* scheduler_;
  ModelConfig config_;
  TextGenerator* generator_;
  Metrics* metrics_;
  const ApiKeys* keys_;
  // Turns Score logits into responses (log-softmax, top-k) off the scheduler's thread.
  std::shared_ptr<ThreadPool> score_pool_;  // shared with callbacks that may outlive us
};

}  // namespace moemesh::gateway
