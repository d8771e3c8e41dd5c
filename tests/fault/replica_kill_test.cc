// Losing a replica mid-generation loses no request and changes no token: the router retries
// the failed worker call on the surviving replica of the group.
#include <signal.h>

#include <atomic>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "tests/mesh_util.h"
#include "tests/test_util.h"

namespace moemesh::testing {
namespace {

struct Stream {
  std::vector<int32_t> tokens;
  grpc::Status status;
  bool finished = false;
};

// Streams a greedy generation, bumping `progress` for every token received.
Stream RunStream(const std::string& address, const std::vector<int32_t>& prompt, int max_tokens,
                 std::atomic<int>* progress) {
  auto gw = GatewayClient(address);
  grpc::ClientContext ctx;
  // Each stream opens a channel of its own: it waits for the connection (a first attempt can
  // fail on a loaded machine) instead of failing at once with UNAVAILABLE.
  WaitForReady(&ctx, absl::Seconds(120));
  v1::GenerateRequest req;
  req.mutable_prompt_tokens()->mutable_ids()->Add(prompt.begin(), prompt.end());
  req.set_max_tokens(max_tokens);
  req.set_ignore_eos(true);  // the reference runs to max_tokens
  auto reader = gw->Generate(&ctx, req);
  v1::GenerateResponse resp;
  Stream s;
  while (reader->Read(&resp)) {
    s.tokens.insert(s.tokens.end(), resp.token_ids().begin(), resp.token_ids().end());
    progress->fetch_add(resp.token_ids_size());
    if (resp.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) s.finished = true;
  }
  s.status = reader->Finish();
  return s;
}

TEST(ReplicaKillTest, SigkillOfOneReplicaLosesNoRequestAndChangesNoToken) {
  TempDir dir;
  GeneratorOptions g;
  // Big enough that a generation spans many router calls while the kill lands.
  g.config = SmallMixtralConfig(256, 128, 256, 4, 4, 2, 8, 2);
  g.seed = 5;
  const std::string model = MakeModel(dir, "model", g);
  MeshOptions o = TestMeshOptions(model, dir.Join("work"), 2, 2);
  // A short per-attempt timeout so that a hung connection would also fail over.
  o.router_args = {"--attempt_timeout=10"};
  auto mesh = Mesh::Start(o);
  ASSERT_TRUE(mesh.ok()) << mesh.status();

  std::vector<std::vector<int32_t>> prompts;
  for (int i = 0; i < 8; ++i) {
    std::vector<int32_t> p;
    for (int j = 0; j < 3 + 4 * i; ++j) p.push_back((j * 29 + i * 7 + 1) % 256);
    prompts.push_back(p);
  }
  const int kMax = 48;
  const auto want = GenerateInproc(model, prompts, kMax);

  std::atomic<int> progress{0};
  std::vector<Stream> got(prompts.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < prompts.size(); ++i) {
    threads.emplace_back(
        [&, i] { got[i] = RunStream((*mesh)->gateway_address(), prompts[i], kMax, &progress); });
  }
  // Kill replica 0 of group 1 once generation is under way.
  const absl::Time give_up = absl::Now() + absl::Seconds(60);
  while (progress.load() < 16 && absl::Now() < give_up) absl::SleepFor(absl::Milliseconds(1));
  const int at_kill = progress.load();
  ASSERT_TRUE((*mesh)->Signal("worker-g1-r0", SIGKILL).ok());
  for (auto& t : threads) t.join();
  EXPECT_LT(at_kill, static_cast<int>(prompts.size()) * kMax)
      << "the kill landed after generation ended";

  for (size_t i = 0; i < prompts.size(); ++i) {
    EXPECT_TRUE(got[i].status.ok()) << "prompt " << i << ": " << got[i].status.error_message();
    EXPECT_TRUE(got[i].finished) << "prompt " << i;
    EXPECT_EQ(got[i].tokens, want[i]) << "prompt " << i;
  }
  const auto exited = (*mesh)->Reap();
  EXPECT_NE(std::find(exited.begin(), exited.end(), "worker-g1-r0"), exited.end());
  // The mesh still serves with one replica of group 1.
  auto gw = GatewayClient((*mesh)->gateway_address());
  auto again = GenerateViaGateway(gw.get(), prompts[0], 8);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(*again, std::vector<int32_t>(want[0].begin(), want[0].begin() + 8));
  (*mesh)->Stop().IgnoreError();  // the killed worker is reported; the rest must stop
}

}  // namespace
}  // namespace moemesh::testing

namespace moemesh::testing {
namespace {

// Workers recycle client connections (GOAWAY) every 0.2 s so that routers re-resolve DNS;
// calls racing a GOAWAY are retried, so generation loses nothing and changes no token.
TEST(ConnectionAgeTest, RecycledWorkerConnectionsLoseNoRequest) {
  TempDir dir;
  GeneratorOptions g;
  g.config = SmallMixtralConfig(256, 128, 256, 4, 4, 2, 8, 2);
  g.seed = 9;
  const std::string model = MakeModel(dir, "model", g);
  MeshOptions o = TestMeshOptions(model, dir.Join("work"), 2, 2);
  o.worker_args = {"--max_connection_age=0.2"};
  auto mesh = Mesh::Start(o);
  ASSERT_TRUE(mesh.ok()) << mesh.status();
  std::vector<std::vector<int32_t>> prompts;
  for (int i = 0; i < 6; ++i) prompts.push_back({1 + i, 7, 3 * i + 2});
  const int kMax = 64;
  const auto want = GenerateInproc(model, prompts, kMax);
  std::vector<absl::StatusOr<std::vector<int32_t>>> got(prompts.size());
  std::vector<std::thread> threads;
  const absl::Time start = absl::Now();
  for (size_t i = 0; i < prompts.size(); ++i) {
    threads.emplace_back([&, i] {
      auto gw = GatewayClient((*mesh)->gateway_address());
      got[i] = GenerateViaGateway(gw.get(), prompts[i], kMax);
    });
  }
  for (auto& t : threads) t.join();
  const absl::Duration took = absl::Now() - start;
  for (size_t i = 0; i < prompts.size(); ++i) {
    ASSERT_TRUE(got[i].ok()) << got[i].status();
    EXPECT_EQ(*got[i], want[i]) << "prompt " << i;
  }
  // With 0.2 s connections, streams that run longer than that crossed a recycle.
  if (took < absl::Milliseconds(250)) {
    GTEST_LOG_(INFO) << "generation took only " << took << "; connections may not have aged";
  }
  EXPECT_TRUE((*mesh)->Stop().ok());
}

}  // namespace
}  // namespace moemesh::testing
