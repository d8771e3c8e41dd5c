#include "tests/mesh_util.h"

#include <cstdlib>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "services/engine/inproc.h"
#include "services/engine/sampler.h"
#include "services/rpc/server_host.h"
#include "services/rpc/tensor_proto.h"
#include "tests/test_util.h"

namespace moemesh::testing {
namespace {

// gRPC 1.51 polls an idle client channel only from its backup poller (every 5 s by default),
// so a server draining while the test still holds an idle channel waits that long for the
// GOAWAY handshake. Poll often in tests.
const bool kFastBackupPoll = [] {
  ::setenv("GRPC_CLIENT_CHANNEL_BACKUP_POLL_INTERVAL_MS", "100", 0);
  return true;
}();

}  // namespace

MeshOptions TestMeshOptions(const std::string& model, const std::string& work, int groups,
                            int replicas) {
  MeshOptions o;
  o.bin_dir = MOEMESH_BIN_DIR;
  o.model = model;
  o.work_dir = work;
  o.groups = groups;
  o.replicas = replicas;
  o.startup_timeout = absl::Seconds(90);
  return o;
}

std::unique_ptr<v1::Gateway::Stub> GatewayClient(const std::string& address) {
  return v1::Gateway::NewStub(MakeChannel(address));
}
std::unique_ptr<v1::Router::Stub> RouterClient(const std::string& address) {
  return v1::Router::NewStub(MakeChannel(address));
}
std::unique_ptr<v1::ExpertWorker::Stub> WorkerClient(const std::string& address) {
  return v1::ExpertWorker::NewStub(MakeChannel(address));
}

void WaitForReady(grpc::ClientContext* ctx, absl::Duration timeout) {
  ctx->set_deadline(absl::ToChronoTime(absl::Now() + timeout));
  ctx->set_wait_for_ready(true);
}

absl::StatusOr<Tensor> ScoreViaGateway(v1::Gateway::Stub* stub, const std::vector<int32_t>& tokens,
                                       absl::Duration timeout) {
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
  // A connection attempt that fails on a loaded machine ("tcp handshaker shutdown") is retried
  // within the deadline instead of failing the call.
  ctx.set_wait_for_ready(true);
  v1::ScoreRequest req;
  req.mutable_tokens()->Add(tokens.begin(), tokens.end());
  v1::ScoreResponse resp;
  grpc::Status s = stub->Score(&ctx, req, &resp);
  if (!s.ok()) return FromGrpcStatus(s);
  return TensorFromProto(resp.logits(), "logits", 2);
}

absl::StatusOr<std::vector<int32_t>> GenerateViaGateway(v1::Gateway::Stub* stub,
                                                        const std::vector<int32_t>& prompt,
                                                        int max_tokens, absl::Duration timeout) {
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
  // A connection attempt that fails on a loaded machine ("tcp handshaker shutdown") is retried
  // within the deadline instead of failing the call.
  ctx.set_wait_for_ready(true);
  v1::GenerateRequest req;
  req.mutable_prompt_tokens()->mutable_ids()->Add(prompt.begin(), prompt.end());
  req.set_max_tokens(max_tokens);
  req.set_ignore_eos(true);  // the reference runs to max_tokens
  auto reader = stub->Generate(&ctx, req);
  v1::GenerateResponse resp;
  std::vector<int32_t> out;
  bool finished = false;
  while (reader->Read(&resp)) {
    out.insert(out.end(), resp.token_ids().begin(), resp.token_ids().end());
    if (resp.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) finished = true;
  }
  grpc::Status s = reader->Finish();
  if (!s.ok()) return FromGrpcStatus(s);
  if (!finished) return absl::InternalError("stream ended without a finish reason");
  return out;
}

void ExpectScoreMatchesEngine(v1::Gateway::Stub* gw, Engine& engine,
                              const std::vector<int32_t>& tokens) {
  auto got = ScoreViaGateway(gw, tokens);
  ASSERT_TRUE(got.ok()) << got.status();
  auto want = engine.Score(tokens);
  ASSERT_TRUE(want.ok()) << want.status();
  ASSERT_EQ(got->shape(), want->shape());
  EXPECT_LE(MaxAbsDiff(got->data(), want->data(), got->numel()), 1e-4) << "n=" << tokens.size();
}

std::vector<absl::StatusOr<std::vector<int32_t>>> GenerateConcurrentlyViaGateway(
    const std::string& address, const std::vector<std::vector<int32_t>>& prompts, int max_tokens) {
  std::vector<absl::StatusOr<std::vector<int32_t>>> got(prompts.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < prompts.size(); ++i) {
    threads.emplace_back([&, i] {
      auto gw = GatewayClient(address);
      got[i] = GenerateViaGateway(gw.get(), prompts[i], max_tokens);
    });
  }
  for (auto& t : threads) t.join();
  return got;
}

std::vector<std::vector<int32_t>> GenerateInproc(const std::string& model,
                                                 const std::vector<std::vector<int32_t>>& prompts,
                                                 int max_tokens) {
  auto m = InprocModel::Load(model);
  EXPECT_TRUE(m.ok()) << m.status();
  std::vector<std::vector<int32_t>> out;
  if (!m.ok()) return out;
  Engine& e = *(*m)->engine;
  for (const auto& p : prompts) {
    auto seq = e.NewSequence();
    std::vector<int32_t> gen;
    std::vector<int32_t> feed = p;
    for (int i = 0; i < max_tokens; ++i) {
      StepInput in{seq.get(), feed, false};
      auto r = e.Step({&in, 1});
      EXPECT_TRUE(r.ok()) << r.status();
      if (!r.ok()) break;
      const int32_t tok = Argmax((*r)[0].span());
      gen.push_back(tok);
      feed = {tok};
    }
    out.push_back(gen);
  }
  return out;
}

}  // namespace moemesh::testing
