// The gateway under memory pressure and past its limits, through real gRPC on a real mesh:
// a KV cache far smaller than the load survives it with every greedy token equal to the
// single-process engine (preemptions counted), requests that can never fit or pass a limit
// get RESOURCE_EXHAUSTED at once, shared prompt prefixes hit the prefix cache, and Score
// returns top-k and next-token log-probabilities equal to the engine's.
#include <cmath>
#include <string>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "services/engine/inproc.h"
#include "services/engine/score_outputs.h"
#include "tests/mesh_util.h"
#include "tests/metrics_scrape.h"
#include "tests/test_util.h"

namespace moemesh::testing {
namespace {

constexpr int kVocab = 128;

// The gateway's metrics once it is idle: the scheduler publishes the KV cache gauges (and the
// step's preemption and prefix counts) in its on_step, which runs after the step's last token
// callback, so a scrape right after a response can still show the blocks of that request in
// use. Scrapes until no block is used (at most 10 s) and returns the last scrape.
absl::StatusOr<std::string> ScrapeWhenIdle(const std::string& metrics_address) {
  const absl::Time give_up = absl::Now() + absl::Seconds(10);
  while (true) {
    auto text = ScrapeMetrics(metrics_address);
    if (!text.ok()) return text;
    if (SumSamples(*text, "moemesh_kv_cache_blocks", {{"state", "used"}}) == 0.0 ||
        absl::Now() > give_up) {
      return text;
    }
    absl::SleepFor(absl::Milliseconds(50));
  }
}

std::vector<int32_t> Tokens(int n, int salt) {
  std::vector<int32_t> t;
  for (int i = 0; i < n; ++i) t.push_back((i * 37 + salt * 11 + 5) % kVocab);
  return t;
}

TEST(ServingLimitsTest, SmallKvCacheSurvivesLoadAndLimitsAreRefused) {
  TempDir dir;
  GeneratorOptions g;
  g.config = SmallMixtralConfig(kVocab, 64, 96, 3, 4, 2, 8, 2);
  g.seed = 11;
  const std::string model = MakeModel(dir, "model", g);
  // A block: 16 tokens × 3 layers × (K + V of 2 heads of 16) floats × 4 bytes = 12 KiB.
  const int64_t block_bytes = 16 * 3 * 64 * 4;
  const int64_t blocks = 14;  // 224 tokens, against about 1,000 wanted at once below

  // 16 requests: 8 distinct prompts of 40..75 tokens, each sent twice (the second shares
  // its whole prompt with the first), 24 tokens each. Eight clients run at once, each sending
  // a prompt and then, once that has finished, its repeat: the eight in flight want far more
  // blocks than the pool has (preemptions), and every repeat comes after its original has
  // registered its blocks (not before, as it could when all 16 raced).
  const int kMax = 24;
  std::vector<std::vector<int32_t>> prompts;
  for (int i = 0; i < 16; ++i) prompts.push_back(Tokens(40 + 5 * (i % 8), 100 + i % 8));
  const auto want = GenerateInproc(model, prompts, kMax);
  ASSERT_EQ(want.size(), prompts.size());

  MeshOptions o = TestMeshOptions(model, dir.Join("work"), 2, 1);
  o.metrics = true;
  o.gateway_args = {absl::StrCat("--kv_cache_bytes=", blocks * block_bytes),
                    "--max_prompt_tokens=150", "--max_score_tokens=100", "--max_step_tokens=64"};
  auto mesh = Mesh::Start(o);
  ASSERT_TRUE(mesh.ok()) << mesh.status();
  const std::string address = (*mesh)->gateway_address();

  std::vector<absl::StatusOr<std::vector<int32_t>>> got(prompts.size(),
                                                        absl::UnknownError("not run"));
  std::vector<std::thread> threads;
  for (size_t i = 0; i < prompts.size() / 2; ++i) {
    threads.emplace_back([&, i] {
      auto gw = GatewayClient(address);
      got[i] = GenerateViaGateway(gw.get(), prompts[i], kMax, absl::Seconds(120));
      got[i + 8] = GenerateViaGateway(gw.get(), prompts[i + 8], kMax, absl::Seconds(120));
    });
  }
  for (auto& t : threads) t.join();
  for (size_t i = 0; i < prompts.size(); ++i) {
    ASSERT_TRUE(got[i].ok()) << "request " << i << ": " << got[i].status();
    EXPECT_EQ(*got[i], want[i]) << "request " << i;
  }

  auto gw = GatewayClient(address);
  // Never fits: 140 + 100 - 1 tokens > 224. Past --max_prompt_tokens. Past --max_score_tokens.
  EXPECT_EQ(GenerateViaGateway(gw.get(), Tokens(140, 1), 100).status().code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(GenerateViaGateway(gw.get(), Tokens(151, 1), 1).status().code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(ScoreViaGateway(gw.get(), Tokens(101, 1)).status().code(),
            absl::StatusCode::kResourceExhausted);

  // Score's top-k and next-token log-probabilities equal the engine's, without the logits.
  const std::vector<int32_t> scored = Tokens(30, 7);
  auto inproc = InprocModel::Load(model);
  ASSERT_TRUE(inproc.ok());
  auto logits = (*inproc)->engine->Score(scored);
  ASSERT_TRUE(logits.ok());
  auto ref = ComputeScoreOutputs(*logits, scored, {.top_k = 5, .token_log_probs = true});
  ASSERT_TRUE(ref.ok());
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(60)));
    v1::ScoreRequest req;
    req.mutable_tokens()->Add(scored.begin(), scored.end());
    req.set_top_log_probs(5);
    req.set_token_log_probs(true);
    req.set_omit_logits(true);
    v1::ScoreResponse resp;
    ASSERT_TRUE(gw->Score(&ctx, req, &resp).ok());
    EXPECT_FALSE(resp.has_logits());
    ASSERT_EQ(resp.top_size(), 30);
    ASSERT_EQ(resp.token_log_probs_size(), 29);
    for (int i = 0; i < 30; ++i) {
      ASSERT_EQ(resp.top(i).ids_size(), 5);
      for (int k = 0; k < 5; ++k) {
        EXPECT_EQ(resp.top(i).ids(k), ref->top_ids[i][k]) << i << "," << k;
        EXPECT_NEAR(resp.top(i).log_probs(k), ref->top_log_probs[i][k], 1e-4);
      }
      if (i < 29) {
        EXPECT_NEAR(resp.token_log_probs(i), ref->token_log_probs[i], 1e-4);
      }
    }
  }
  // The gateway is still there and still right.
  auto again = GenerateViaGateway(gw.get(), prompts[3], kMax);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(*again, want[3]);

  auto address_m = MetricsAddressFromLog((*mesh)->gateway().log);
  ASSERT_TRUE(address_m.ok()) << address_m.status();
  // Under load a repeat's cached blocks may already have been evicted by the other clients;
  // on an idle gateway they cannot be: prompts[3] again, right after the request above, must
  // find every full block of its prompt but the one holding its last token (55 tokens: 3 of 16).
  auto before = ScrapeWhenIdle(*address_m);
  ASSERT_TRUE(before.ok()) << before.status();
  const double hit_before = SumSamples(*before, "moemesh_prefix_cache_hit_tokens_total");
  auto repeat = GenerateViaGateway(gw.get(), prompts[3], kMax);
  ASSERT_TRUE(repeat.ok()) << repeat.status();
  EXPECT_EQ(*repeat, want[3]);

  auto text = ScrapeWhenIdle(*address_m);
  ASSERT_TRUE(text.ok()) << text.status();
  const double preemptions = SumSamples(*text, "moemesh_preemptions_total");
  const double query = SumSamples(*text, "moemesh_prefix_cache_query_tokens_total");
  const double hit = SumSamples(*text, "moemesh_prefix_cache_hit_tokens_total");
  std::cerr << "preemptions " << preemptions << ", prefix cache hit rate " << hit / query << " ("
            << hit << " of " << query << " tokens)\n";
  EXPECT_GT(preemptions, 0) << "the cache was meant to run out";
  EXPECT_GT(hit, 0) << "repeated prompts should have hit the prefix cache";
  EXPECT_EQ(hit - hit_before, static_cast<double>((prompts[3].size() - 1) / 16 * 16))
      << "a repeat on an idle gateway finds its prompt's blocks cached";
  EXPECT_EQ(SumSamples(*text, "moemesh_kv_cache_blocks", {{"state", "total"}}),
            static_cast<double>(blocks));
  EXPECT_EQ(SumSamples(*text, "moemesh_kv_cache_blocks", {{"state", "used"}}), 0.0)
      << "every block came back";
  // Steps by kind and by micro-batches: both kinds ran, and all of them whole (the default).
  const double decode_steps =
      SumSamples(*text, "moemesh_gateway_steps_total", {{"kind", "decode"}});
  const double prefill_steps =
      SumSamples(*text, "moemesh_gateway_steps_total", {{"kind", "prefill"}});
  EXPECT_GT(decode_steps, 0);
  EXPECT_GT(prefill_steps, 0);
  EXPECT_EQ(SumSamples(*text, "moemesh_gateway_steps_total", {{"micro_batches", "1"}}),
            decode_steps + prefill_steps);
  // The engine thread's busy time by stage: the stages that run take time, and they add up to
  // the busy time.
  const double busy = SumSamples(*text, "moemesh_gateway_busy_seconds_total");
  double stages = 0;
  for (const char* stage : {"attention", "moe_call", "dense_ffn", "lm_head", "other"}) {
    const double s = SumSamples(*text, "moemesh_gateway_stage_seconds_total", {{"stage", stage}});
    if (std::string(stage) != "dense_ffn") {
      EXPECT_GT(s, 0) << stage;
    }
    stages += s;
  }
  EXPECT_GT(busy, 0);
  EXPECT_NEAR(stages, busy, 1e-3 * busy);
  auto stopped = (*mesh)->Stop();
  EXPECT_TRUE(stopped.ok()) << stopped;
}

}  // namespace
}  // namespace moemesh::testing
