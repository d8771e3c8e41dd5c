// The mesh in the testbed (issue 12): added latency on every hop (delaying proxies), gateway
// and router pinned to one CPU and the workers to another, with one or two micro-batches per
// gateway step. The contract holds whatever the split: logits within 1e-4 of the single
// process, and greedy tokens of concurrent streams identical to it.
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "services/engine/inproc.h"
#include "tests/mesh_util.h"
#include "tests/test_util.h"

namespace moemesh::testing {
namespace {

struct Case {
  int micro_batches;
  int latency_us;
  bool pin;
};

class MicroBatchMeshTest : public ::testing::TestWithParam<Case> {};

std::vector<int32_t> Tokens(int n, int salt) {
  std::vector<int32_t> t;
  for (int i = 0; i < n; ++i) t.push_back((i * 37 + salt * 11 + 5) % 128);
  return t;
}

TEST_P(MicroBatchMeshTest, LogitsAndGreedyTokensMatchSingleProcess) {
  const Case c = GetParam();
  TempDir dir;
  GeneratorOptions g;
  g.config = SmallMixtralConfig(128, 64, 96, 3, 4, 2, 8, 2);
  g.seed = 11;
  const std::string model = MakeModel(dir, "model", g);
  auto inproc = InprocModel::Load(model);
  ASSERT_TRUE(inproc.ok()) << inproc.status();

  MeshOptions o = TestMeshOptions(model, dir.Join("work"), /*groups=*/2);
  o.micro_batches = c.micro_batches;
  o.added_latency = absl::Microseconds(c.latency_us);
  if (c.pin && std::thread::hardware_concurrency() >= 2) {
    o.gateway_cpus = "0";
    o.worker_cpus = "1";
    o.kernel_threads = 1;
  }
  // Longer prompts are prefilled in chunks; every step of several inputs is split (the
  // gateway's default, adaptive, may run some whole).
  o.gateway_args = {"--max_step_tokens=16", "--micro_batch_policy=always"};
  auto mesh = Mesh::Start(o);
  ASSERT_TRUE(mesh.ok()) << mesh.status();
  auto gw = GatewayClient((*mesh)->gateway_address());
  for (int n : {1, 7, 40}) {
    const std::vector<int32_t> tokens = Tokens(n, n);
    ExpectScoreMatchesEngine(gw.get(), *(*inproc)->engine, tokens);
  }
  // Concurrent streams share steps, so the gateway splits real batches.
  std::vector<std::vector<int32_t>> prompts;
  for (int i = 0; i < 6; ++i) prompts.push_back(Tokens(3 + 5 * i, 100 + i));
  const auto want = GenerateInproc(model, prompts, 8);
  const auto got = GenerateConcurrentlyViaGateway((*mesh)->gateway_address(), prompts, 8);
  for (size_t i = 0; i < prompts.size(); ++i) {
    ASSERT_TRUE(got[i].ok()) << got[i].status();
    EXPECT_EQ(*got[i], want[i]) << "stream " << i;
  }
  EXPECT_TRUE((*mesh)->Stop().ok());
}

INSTANTIATE_TEST_SUITE_P(Testbed, MicroBatchMeshTest,
                         ::testing::Values(Case{1, 0, false}, Case{2, 0, false}, Case{1, 300, true},
                                           Case{2, 300, true}),
                         [](const auto& info) {
                           return absl::StrCat(info.param.micro_batches, "micro_",
                                               info.param.latency_us, "us",
                                               info.param.pin ? "_pinned" : "");
                         });

}  // namespace
}  // namespace moemesh::testing
