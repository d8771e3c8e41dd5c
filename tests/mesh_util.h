// Helpers for tests that run a real mesh: gRPC clients of the gateway, router and workers,
// and in-process references to compare against.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "moemesh/v1/expert_worker.grpc.pb.h"
#include "moemesh/v1/gateway.grpc.pb.h"
#include "moemesh/v1/router.grpc.pb.h"
#include "services/engine/engine.h"
#include "services/mesh/launcher.h"
#include "services/tensor/tensor.h"

namespace moemesh::testing {

// Mesh options for `model` with the test binaries and a work dir under `work`.
MeshOptions TestMeshOptions(const std::string& model, const std::string& work, int groups,
                            int replicas = 1);

std::unique_ptr<v1::Gateway::Stub> GatewayClient(const std::string& address);
std::unique_ptr<v1::Router::Stub> RouterClient(const std::string& address);
std::unique_ptr<v1::ExpertWorker::Stub> WorkerClient(const std::string& address);

// Gives a call that is meant to reach the server `timeout` as its deadline and makes it wait
// for the channel to connect within that deadline. Without wait-for-ready a call fails at once
// with UNAVAILABLE when a connection attempt fails, as a first one on a fresh channel can on a
// loaded machine. Not for calls that must fail fast (probes of a server that refuses them).
void WaitForReady(grpc::ClientContext* ctx, absl::Duration timeout = absl::Seconds(60));

// Score through the gateway: [n, vocab] logits.
absl::StatusOr<Tensor> ScoreViaGateway(v1::Gateway::Stub* stub, const std::vector<int32_t>& tokens,
                                       absl::Duration timeout = absl::Seconds(60));
// Scores `tokens` through the gateway and in `engine` (the single process): same shape, logits
// within 1e-4 (the mesh's contract). Failures are recorded with the token count.
void ExpectScoreMatchesEngine(v1::Gateway::Stub* gw, Engine& engine,
                              const std::vector<int32_t>& tokens);
// Greedy generation through the gateway, collecting the streamed ids.
absl::StatusOr<std::vector<int32_t>> GenerateViaGateway(
    v1::Gateway::Stub* stub, const std::vector<int32_t>& prompt, int max_tokens,
    absl::Duration timeout = absl::Seconds(120));
// GenerateViaGateway of every prompt at once, each on a client (and connection) of its own,
// so that the gateway batches them into shared steps.
std::vector<absl::StatusOr<std::vector<int32_t>>> GenerateConcurrentlyViaGateway(
    const std::string& address, const std::vector<std::vector<int32_t>>& prompts, int max_tokens);
// Greedy generation in process (the yardstick), one sequence at a time.
std::vector<std::vector<int32_t>> GenerateInproc(const std::string& model,
                                                 const std::vector<std::vector<int32_t>>& prompts,
                                                 int max_tokens);

}  // namespace moemesh::testing
