// Issue 9 §3–4: failures touch only what they must, hostile input gets a clear error.
//
// - A group named to the router as one multi-address target (ipv4:HOST:P1,HOST:P2, as a DNS
//   name with several addresses would be) survives the SIGKILL of one address mid-generation
//   with the same greedy tokens.
// - A SIGSTOPped replica (a black hole: the connection stays open, nothing answers) costs the
//   affected calls one attempt timeout, then they move to the other replica.
// - A worker rejects, before allocating, a small RunExperts with a million duplicate
//   assignments and one with more experts per token than top-k; the public gateway rejects an
//   oversized message; the mesh then answers as before.
#include <signal.h>
#include <sys/resource.h>

#include <atomic>
#include <fstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "services/rpc/tensor_proto.h"
#include "tests/mesh_util.h"
#include "tests/test_util.h"

namespace moemesh::testing {
namespace {

GeneratorOptions SmallModel(uint64_t seed) {
  GeneratorOptions g;
  g.config = SmallMixtralConfig(256, 128, 256, 4, 4, 2, 8, 2);
  g.seed = seed;
  return g;
}

std::vector<std::vector<int32_t>> Prompts(int n) {
  std::vector<std::vector<int32_t>> prompts;
  for (int i = 0; i < n; ++i) {
    std::vector<int32_t> p;
    for (int j = 0; j < 3 + 3 * i; ++j) p.push_back((j * 31 + i * 11 + 2) % 256);
    prompts.push_back(p);
  }
  return prompts;
}

// Streams a greedy generation, bumping `progress` for every token received.
absl::StatusOr<std::vector<int32_t>> Stream(const std::string& address,
                                            const std::vector<int32_t>& prompt, int max_tokens,
                                            std::atomic<int>* progress) {
  auto gw = GatewayClient(address);
  grpc::ClientContext ctx;
  // A channel of its own: it waits for the connection (a first attempt can fail on a loaded
  // machine) instead of failing at once with UNAVAILABLE.
  WaitForReady(&ctx, absl::Seconds(120));
  v1::GenerateRequest req;
  req.mutable_prompt_tokens()->mutable_ids()->Add(prompt.begin(), prompt.end());
  req.set_max_tokens(max_tokens);
  auto reader = gw->Generate(&ctx, req);
  v1::GenerateResponse resp;
  std::vector<int32_t> tokens;
  while (reader->Read(&resp)) {
    tokens.insert(tokens.end(), resp.token_ids().begin(), resp.token_ids().end());
    progress->fetch_add(resp.token_ids_size());
  }
  const grpc::Status s = reader->Finish();
  if (!s.ok()) return FromGrpcStatus(s);
  return tokens;
}

// Runs every prompt concurrently; once `after` tokens arrived, calls `fault` once.
std::vector<absl::StatusOr<std::vector<int32_t>>> GenerateWithFault(
    const std::string& gateway, const std::vector<std::vector<int32_t>>& prompts, int max_tokens,
    int after, const std::function<void()>& fault, int* at_fault) {
  std::atomic<int> progress{0};
  std::vector<absl::StatusOr<std::vector<int32_t>>> got(prompts.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < prompts.size(); ++i) {
    threads.emplace_back([&, i] { got[i] = Stream(gateway, prompts[i], max_tokens, &progress); });
  }
  const absl::Time give_up = absl::Now() + absl::Seconds(60);
  while (progress.load() < after && absl::Now() < give_up) absl::SleepFor(absl::Milliseconds(1));
  *at_fault = progress.load();
  fault();
  for (auto& t : threads) t.join();
  return got;
}

TEST(MultiAddressGroupTest, SigkillOfOneAddressLosesNoRequestAndChangesNoToken) {
  TempDir dir;
  const std::string model = MakeModel(dir, "model", SmallModel(5));
  MeshOptions o = TestMeshOptions(model, dir.Join("work"), 2, 2);
  o.multi_address_groups = true;  // group g is "ipv4:127.0.0.1:P0,127.0.0.1:P1"
  auto mesh = Mesh::Start(o);
  ASSERT_TRUE(mesh.ok()) << mesh.status();
  auto router = RouterClient((*mesh)->router_address());
  {
    grpc::ClientContext ctx;
    WaitForReady(&ctx, absl::Seconds(60));  // the first call on a new channel
    v1::TopologyRequest req;
    v1::TopologyResponse topo;
    ASSERT_TRUE(router->Topology(&ctx, req, &topo).ok());
    ASSERT_EQ(topo.groups_size(), 2);
    ASSERT_EQ(topo.groups(1).replicas_size(), 1);                            // one target...
    EXPECT_EQ(topo.groups(1).replicas(0).endpoint().rfind("ipv4:", 0), 0u);  // ...of two addresses
  }
  const auto prompts = Prompts(6);
  const int kMax = 40;
  const auto want = GenerateInproc(model, prompts, kMax);
  int at_kill = 0;
  auto got = GenerateWithFault((*mesh)->gateway_address(), prompts, kMax, 12,
                               [&] { ASSERT_TRUE((*mesh)->Signal("worker-g1-r0", SIGKILL).ok()); },
                               &at_kill);
  EXPECT_LT(at_kill, static_cast<int>(prompts.size()) * kMax) << "the kill came after the end";
  for (size_t i = 0; i < prompts.size(); ++i) {
    ASSERT_TRUE(got[i].ok()) << "prompt " << i << ": " << got[i].status();
    EXPECT_EQ(*got[i], want[i]) << "prompt " << i;
  }
  // New requests keep succeeding on the surviving address.
  auto gw = GatewayClient((*mesh)->gateway_address());
  auto again = GenerateViaGateway(gw.get(), prompts[1], kMax);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(*again, want[1]);
  (*mesh)->Stop().IgnoreError();  // the killed worker is reported
}

TEST(BlackHoleTest, SigstoppedReplicaCostsAtMostAnAttemptTimeout) {
  TempDir dir;
  const std::string model = MakeModel(dir, "model", SmallModel(6));
  MeshOptions o = TestMeshOptions(model, dir.Join("work"), 2, 2);
  o.router_args = {"--attempt_timeout=2"};
  auto mesh = Mesh::Start(o);
  ASSERT_TRUE(mesh.ok()) << mesh.status();
  const auto prompts = Prompts(4);
  const int kMax = 32;
  const auto want = GenerateInproc(model, prompts, kMax);
  int at_stop = 0;
  auto got = GenerateWithFault((*mesh)->gateway_address(), prompts, kMax, 8,
                               [&] { ASSERT_TRUE((*mesh)->Signal("worker-g0-r0", SIGSTOP).ok()); },
                               &at_stop);
  EXPECT_LT(at_stop, static_cast<int>(prompts.size()) * kMax) << "the stop came after the end";
  for (size_t i = 0; i < prompts.size(); ++i) {
    ASSERT_TRUE(got[i].ok()) << "prompt " << i << ": " << got[i].status();
    EXPECT_EQ(*got[i], want[i]) << "prompt " << i;
  }
  // Still stopped: a new request is served by the other replica, never held forever (its
  // deadline is far beyond one attempt timeout plus a retry).
  auto gw = GatewayClient((*mesh)->gateway_address());
  auto again = GenerateViaGateway(gw.get(), prompts[2], kMax, absl::Seconds(60));
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(*again, want[2]);
  ASSERT_TRUE((*mesh)->Signal("worker-g0-r0", SIGCONT).ok());
  EXPECT_TRUE((*mesh)->Stop().ok());
}

TEST(BlackHoleTest, SigstoppedRouterFailsStepsAtTheirDeadlineNotNever) {
  TempDir dir;
  const std::string model = MakeModel(dir, "model", SmallModel(8));
  MeshOptions o = TestMeshOptions(model, dir.Join("work"), 1, 1);
  // Requests that carry no deadline get the gateway's default for their steps.
  o.gateway_args = {"--default_deadline=3", "--router_attempt_timeout=1",
                    "--router_max_attempts=10"};
  auto mesh = Mesh::Start(o);
  ASSERT_TRUE(mesh.ok()) << mesh.status();
  const auto prompts = Prompts(1);
  const auto want = GenerateInproc(model, prompts, 8);
  auto gw = GatewayClient((*mesh)->gateway_address());
  ASSERT_TRUE((*mesh)->Signal("router", SIGSTOP).ok());
  // No client deadline: only the mesh's own deadlines can end this request. The test gives
  // up (cancels) after 60 s so that it stays bounded if they do not. The gateway itself is
  // not stopped: the call waits for a connection to it rather than failing fast if a first
  // attempt fails on a loaded machine.
  grpc::ClientContext ctx;
  ctx.set_wait_for_ready(true);
  grpc::Status s;
  absl::Notification done;
  const absl::Time start = absl::Now();
  std::thread t([&] {
    v1::GenerateRequest req;
    req.mutable_prompt_tokens()->mutable_ids()->Add(prompts[0].begin(), prompts[0].end());
    req.set_max_tokens(8);
    auto reader = gw->Generate(&ctx, req);
    v1::GenerateResponse resp;
    while (reader->Read(&resp)) {
    }
    s = reader->Finish();
    done.Notify();
  });
  const bool ended = done.WaitForNotificationWithTimeout(absl::Seconds(60));
  if (!ended) ctx.TryCancel();
  t.join();
  EXPECT_TRUE(ended) << "the request was still waiting after 60 s";
  // The gateway's default step deadline (3 s) ended it.
  EXPECT_EQ(s.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << s.error_message();
  EXPECT_EQ(s.error_message().find("127.0.0.1"), std::string::npos) << s.error_message();
  GTEST_LOG_(INFO) << "ended after " << absl::Now() - start;
  ASSERT_TRUE((*mesh)->Signal("router", SIGCONT).ok());
  const absl::Time cont = absl::Now();
  auto again = GenerateViaGateway(gw.get(), prompts[0], 8, absl::Seconds(60));
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(*again, want[0]);
  GTEST_LOG_(INFO) << "served again after " << absl::Now() - cont;
  EXPECT_TRUE((*mesh)->Stop().ok());
}

// Resident set size of `pid` in bytes (0 when unreadable).
int64_t RssBytes(pid_t pid) {
  std::ifstream f(absl::StrCat("/proc/", pid, "/statm"));
  int64_t size = 0, resident = 0;
  f >> size >> resident;
  return resident * 4096;
}

TEST(HostileInputTest, WorkerAndGatewayRejectAbusiveRequestsAndKeepServing) {
  TempDir dir;
  const std::string model = MakeModel(dir, "model", SmallModel(7));
  MeshOptions o = TestMeshOptions(model, dir.Join("work"), 1, 1);
  auto mesh = Mesh::Start(o);
  ASSERT_TRUE(mesh.ok()) << mesh.status();
  const auto prompts = Prompts(1);
  const auto want = GenerateInproc(model, prompts, 16);
  auto worker = WorkerClient((*mesh)->workers()[0].address);
  const pid_t worker_pid = (*mesh)->workers()[0].pid;
  const int64_t rss_before = RssBytes(worker_pid);

  // One token, a million assignments of the same expert: rejected before any allocation.
  auto run = [&](const std::vector<int32_t>& offsets, const std::vector<int32_t>& experts) {
    // Every call must reach the worker (whose answer is checked), the first on a new channel.
    grpc::ClientContext ctx;
    WaitForReady(&ctx, absl::Seconds(20));
    v1::RunExpertsRequest req;
    req.set_layer(0);
    Tensor t = Tensor::Zeros({static_cast<int64_t>(offsets.size()) - 1, 128});
    TensorToProto(t, DType::kF32, req.mutable_tokens());
    req.mutable_offsets()->Add(offsets.begin(), offsets.end());
    req.mutable_experts()->Add(experts.begin(), experts.end());
    for (size_t i = 0; i < experts.size(); ++i) req.add_weights(0.5f);
    v1::RunExpertsResponse resp;
    return worker->RunExperts(&ctx, req, &resp);
  };
  const absl::Time start = absl::Now();
  grpc::Status s = run({0, 1000000}, std::vector<int32_t>(1000000, 1));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
  EXPECT_LT(absl::Now() - start, absl::Seconds(20));
  // Distinct experts, but more than top-k (2) per token.
  s = run({0, 3}, {0, 1, 2});
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
  // The same expert twice within top-k.
  s = run({0, 2}, {3, 3});
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
  // Offsets that lie about the number of assignments.
  s = run({0, 1 << 30}, {1});
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
  // A well-formed call still works.
  s = run({0, 2}, {0, 1});
  EXPECT_TRUE(s.ok()) << s.error_message();
  // The worker did not grow by anything near what the abusive call would have asked.
  EXPECT_LT(RssBytes(worker_pid), rss_before + (512ll << 20));

  // The public gateway refuses a message over its receive limit (4 MiB by default).
  {
    auto gw = GatewayClient((*mesh)->gateway_address());
    grpc::ClientContext ctx;
    WaitForReady(&ctx, absl::Seconds(20));  // a new channel; the gateway's answer is checked
    v1::GenerateRequest req;
    req.set_prompt(std::string(6 << 20, 'a'));
    req.set_max_tokens(1);
    auto reader = gw->Generate(&ctx, req);
    v1::GenerateResponse resp;
    while (reader->Read(&resp)) {
    }
    const grpc::Status gs = reader->Finish();
    EXPECT_EQ(gs.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << gs.error_message();
  }
  // Nothing died, and the answer is unchanged.
  EXPECT_TRUE((*mesh)->Reap().empty());
  auto gw = GatewayClient((*mesh)->gateway_address());
  auto again = GenerateViaGateway(gw.get(), prompts[0], 16);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(*again, want[0]);
  EXPECT_TRUE((*mesh)->Stop().ok());
}

}  // namespace
}  // namespace moemesh::testing
