// Bounded load on a real mesh (2 groups × 2 replicas): many concurrent clients, every request
// succeeds with the single-process engine's greedy tokens, no token is lost or counted twice
// on the way through the router, and continuous batching really happened (steps carry many
// sequences). Asserts on counts only, never on speed.
#include <cmath>
#include <iostream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "tests/mesh_util.h"
#include "tests/metrics_scrape.h"
#include "tests/test_util.h"

namespace moemesh::testing {
namespace {

constexpr int kVocab = 128;
constexpr int kLayers = 3;  // every layer is MoE in a Mixtral
constexpr int kTopK = 2;

absl::StatusOr<std::string> Scrape(const Mesh::Process& p) {
  auto address = MetricsAddressFromLog(p.log);
  if (!address.ok()) return address.status();
  return ScrapeMetrics(*address);
}

TEST(MeshLoadTest, ConcurrentClientsGetExactTokensAndShareSteps) {
  TempDir dir;
  GeneratorOptions g;
  g.config = SmallMixtralConfig(kVocab, 64, 96, kLayers, 4, 2, 8, kTopK);
  g.seed = 21;
  const std::string model = MakeModel(dir, "model", g);

  const int kClients = 32, kPerClient = 3, kMax = 16;
  // Request (c, r) uses prompt c * kPerClient + r: lengths 1..20, all different.
  std::vector<std::vector<int32_t>> prompts;
  int64_t fed_tokens = 0;  // tokens the engine consumes: the prompt, then all but the last token
  int64_t prompt_tokens = 0;
  for (int i = 0; i < kClients * kPerClient; ++i) {
    std::vector<int32_t> p;
    for (int j = 0; j < 1 + (i * 7) % 20; ++j) p.push_back((j * 31 + i * 17 + 3) % kVocab);
    prompt_tokens += static_cast<int64_t>(p.size());
    fed_tokens += static_cast<int64_t>(p.size()) + kMax - 1;
    prompts.push_back(std::move(p));
  }
  const auto want = GenerateInproc(model, prompts, kMax);
  ASSERT_EQ(want.size(), prompts.size());

  MeshOptions o = TestMeshOptions(model, dir.Join("work"), 2, 2);
  o.metrics = true;
  auto mesh = Mesh::Start(o);
  ASSERT_TRUE(mesh.ok()) << mesh.status();
  const std::string gw_address = (*mesh)->gateway_address();

  std::vector<absl::StatusOr<std::vector<int32_t>>> got(prompts.size(),
                                                        absl::UnknownError("not run"));
  std::vector<std::thread> threads;
  for (int c = 0; c < kClients; ++c) {
    threads.emplace_back([&, c] {
      auto gw = GatewayClient(gw_address);
      for (int r = 0; r < kPerClient; ++r) {
        const int i = c * kPerClient + r;
        got[i] = GenerateViaGateway(gw.get(), prompts[i], kMax, absl::Seconds(50));
      }
    });
  }
  for (auto& t : threads) t.join();
  int failures = 0;
  for (size_t i = 0; i < prompts.size(); ++i) {
    if (!got[i].ok()) {
      ADD_FAILURE() << "request " << i << ": " << got[i].status();
      ++failures;
      continue;
    }
    EXPECT_EQ(*got[i], want[i]) << "request " << i;
  }
  ASSERT_EQ(failures, 0);

  // Every request has finished, so every counter below is final.
  auto gateway = Scrape((*mesh)->gateway());
  ASSERT_TRUE(gateway.ok()) << gateway.status();
  auto router = Scrape((*mesh)->router());
  ASSERT_TRUE(router.ok()) << router.status();

  EXPECT_EQ(SumSamples(*gateway, "moemesh_tokens_total", {{"kind", "completion"}}),
            static_cast<double>(prompts.size() * kMax));
  EXPECT_EQ(SumSamples(*gateway, "moemesh_tokens_total", {{"kind", "prompt"}}),
            static_cast<double>(prompt_tokens));
  EXPECT_EQ(
      SumSamples(*gateway, "moemesh_requests_total", {{"method", "Generate"}, {"code", "OK"}}),
      static_cast<double>(prompts.size()));

  // The router saw every token of every step exactly once per layer, top-k times.
  const double expert_tokens = SumSamples(*router, "moemesh_expert_tokens_total");
  EXPECT_GT(expert_tokens, 0);
  EXPECT_EQ(expert_tokens, static_cast<double>(fed_tokens * kLayers * kTopK));
  // Each (token, group) send was computed by exactly one worker replica.
  double worker_rows = 0;
  for (const Mesh::Process& w : (*mesh)->workers()) {
    auto text = Scrape(w);
    ASSERT_TRUE(text.ok()) << w.name << ": " << text.status();
    worker_rows += SumSamples(*text, "moemesh_worker_tokens_total");
  }
  EXPECT_EQ(worker_rows, SumSamples(*router, "moemesh_dispatch_token_sends_total"));
  // Each worker read a whole number of experts' weights (F32: 3 matrices of 96 x 64), at least
  // one per call and at most one per (token, expert) it computed.
  const double expert_bytes = 3.0 * 96 * 64 * 4;
  double bytes_read = 0, held = 0;
  for (const Mesh::Process& w : (*mesh)->workers()) {
    auto text = Scrape(w);
    ASSERT_TRUE(text.ok()) << w.name << ": " << text.status();
    const double bytes = SumSamples(*text, "moemesh_expert_weight_bytes_read_total");
    const double runs = bytes / expert_bytes;
    EXPECT_EQ(runs, std::floor(runs)) << w.name;
    EXPECT_GE(runs, SumSamples(*text, "moemesh_requests_total",
                               {{"method", "RunExperts"}, {"code", "OK"}}))
        << w.name;
    EXPECT_LE(runs, SumSamples(*text, "moemesh_worker_tokens_total") * kTopK) << w.name;
    bytes_read += bytes;
    // What it holds: its share of the 3 layers' 8 experts, on the CPU.
    held += SumSamples(*text, "moemesh_worker_weight_bytes", {{"device", "cpu"}});
  }
  EXPECT_GT(bytes_read, 0);
  EXPECT_EQ(held, kLayers * 8 * expert_bytes * 2);  // 2 replicas of every group

  // Continuous batching: one router call per layer per step, and far fewer steps than the
  // kClients * kPerClient * kMax that one-request-at-a-time decoding would need.
  const double forwards =
      SumSamples(*router, "moemesh_requests_total", {{"method", "Forward"}, {"code", "OK"}});
  const double steps = forwards / kLayers;
  EXPECT_EQ(std::fmod(forwards, kLayers), 0.0);
  std::cerr << "steps " << steps << ", mean tokens per step "
            << static_cast<double>(fed_tokens) / steps << "\n";
  const double unbatched_steps = static_cast<double>(prompts.size() * kMax);
  EXPECT_LT(steps, unbatched_steps / 4) << "steps carried too few sequences to be batched";
  EXPECT_GT(static_cast<double>(fed_tokens) / steps, 4.0) << "mean tokens per step";

  // The gateway's own view of the batch, moemesh_step_tokens (observed by the scheduler's
  // on_step for every step that ran sequences), must agree with the router's. on_step runs after
  // the step's token callbacks, so the last step may still be unobserved when its last response
  // reaches the client: scrape again until the gateway has caught up (bounded), then assert.
  double step_count = 0, step_sum = 0;
  const absl::Time give_up = absl::Now() + absl::Seconds(10);
  while (true) {
    auto text = Scrape((*mesh)->gateway());
    ASSERT_TRUE(text.ok()) << text.status();
    step_count = SumSamples(*text, "moemesh_step_tokens_count");
    step_sum = SumSamples(*text, "moemesh_step_tokens_sum");
    if ((step_sum == static_cast<double>(fed_tokens) && step_count == steps) ||
        absl::Now() > give_up) {
      break;
    }
    absl::SleepFor(absl::Milliseconds(50));
  }
  ASSERT_GT(step_count, 0) << "the gateway exports no moemesh_step_tokens samples";
  EXPECT_GT(step_sum / step_count, 1.0);
  EXPECT_EQ(step_sum, static_cast<double>(fed_tokens));
  EXPECT_EQ(step_count, steps);
  auto stopped = (*mesh)->Stop();
  EXPECT_TRUE(stopped.ok()) << stopped;
}

}  // namespace
}  // namespace moemesh::testing
