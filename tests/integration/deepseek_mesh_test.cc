// The mesh contract for DeepseekV3ForCausalLM: MLA attention and dense layers in the gateway,
// sigmoid group-limited gating in the router, routed and shared experts in the workers.

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "services/engine/inproc.h"
#include "tests/mesh_util.h"
#include "tests/test_util.h"

namespace moemesh::testing {
namespace {

struct Case {
  int groups;
  int replicas;
  DType dtype;
  bool shared_in_gateway = false;
};

class DeepseekMeshTest : public ::testing::TestWithParam<Case> {};

TEST_P(DeepseekMeshTest, LogitsAndGreedyTokensMatchSingleProcess) {
  const Case c = GetParam();
  TempDir dir;
  GeneratorOptions g;
  g.config = SmallDeepseekConfig(128, 64, 3);
  g.dtype = c.dtype;
  g.seed = 21;
  const std::string model = MakeModel(dir, "model", g);
  auto inproc = InprocModel::Load(model);
  ASSERT_TRUE(inproc.ok()) << inproc.status();

  MeshOptions o = TestMeshOptions(model, dir.Join("work"), c.groups, c.replicas);
  o.gateway_args = {"--max_step_tokens=16"};
  o.shared_experts_in_gateway = c.shared_in_gateway;
  auto mesh = Mesh::Start(o);
  ASSERT_TRUE(mesh.ok()) << mesh.status();
  auto gw = GatewayClient((*mesh)->gateway_address());
  for (int n : {1, 9, 33}) {
    std::vector<int32_t> tokens;
    for (int i = 0; i < n; ++i) tokens.push_back((i * 53 + n) % 128);
    ExpectScoreMatchesEngine(gw.get(), *(*inproc)->engine, tokens);
  }
  // Greedy generation of concurrent prompts (batched together in the gateway).
  std::vector<std::vector<int32_t>> prompts;
  for (int i = 0; i < 4; ++i) {
    std::vector<int32_t> p;
    for (int j = 0; j < 2 + 6 * i; ++j) p.push_back((j * 17 + i * 5 + 3) % 128);
    prompts.push_back(p);
  }
  const auto want = GenerateInproc(model, prompts, 10);
  const auto got = GenerateConcurrentlyViaGateway((*mesh)->gateway_address(), prompts, 10);
  for (size_t i = 0; i < prompts.size(); ++i) {
    ASSERT_TRUE(got[i].ok()) << got[i].status();
    EXPECT_EQ(*got[i], want[i]) << "prompt " << i;
  }
  EXPECT_TRUE((*mesh)->Stop().ok());
}

INSTANTIATE_TEST_SUITE_P(Layouts, DeepseekMeshTest,
                         ::testing::Values(Case{1, 1, DType::kF32}, Case{2, 1, DType::kF32},
                                           Case{4, 1, DType::kF32}, Case{2, 2, DType::kF32},
                                           Case{2, 1, DType::kF8E4M3},
                                           Case{2, 1, DType::kF32, /*shared_in_gateway=*/true}),
                         [](const auto& info) {
                           return absl::StrCat(
                               "groups", info.param.groups, "_replicas", info.param.replicas, "_",
                               info.param.dtype == DType::kF32 ? "f32" : "fp8",
                               info.param.shared_in_gateway ? "_shared_in_gateway" : "");
                         });

}  // namespace
}  // namespace moemesh::testing
