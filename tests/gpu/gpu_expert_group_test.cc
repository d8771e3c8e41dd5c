// The GPU expert worker's compute (a LocalExpertGroup with CUDA DeviceExperts attached) against
// the CPU group over the same checkpoint, and a mesh whose workers compute on the GPU against
// the single-process engine. Skipped without CUDA or a GPU.
//
// Tolerances (normwise relative error of each output row, against the CPU group):
//   f32   1e-5: the device computes in IEEE F32 (no TF32); only summation order differs.
//   bf16  1.5e-2 and fp8 1.5e-2: the device rounds the tokens and the SiLU·mul result to BF16
//         (and FP8 weights, dequantised, to BF16; with the grouped GEMM's BF16 output also the
//         GEMMs' results) before its next step, unit roundoff 2^-9; the errors measured are a
//         few 1e-3 (tools/gpu/gpu_experts_check.cc states the same).
// The mesh test uses an F32 model, so the mesh's contract holds as on the CPU: logits within
// 1e-4 of the engine and the same greedy tokens.
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "services/compute/backend.h"
#include "services/engine/inproc.h"
#include "services/mesh/launcher.h"
#include "services/model/config.h"
#include "services/model/generator.h"
#include "services/model/safetensors.h"
#include "services/moe/local_expert_group.h"
#include "tests/mesh_util.h"
#include "tests/test_util.h"
#ifdef MOEMESH_HAVE_CUDA
#include "services/compute/cuda/cuda_backend.h"
#endif

namespace moemesh {
namespace {

using ::moemesh::testing::RandomFloats;
using ::moemesh::testing::TempDir;

bool HaveGpu() {
#ifdef MOEMESH_HAVE_CUDA
  return CudaDeviceCount() > 0;
#else
  return false;
#endif
}

struct Case {
  DType dtype;
  bool deepseek;
  double tol;
};

class GpuExpertGroupTest : public ::testing::TestWithParam<Case> {};

TEST_P(GpuExpertGroupTest, MatchesTheCpuGroupWithinTheDtypesTolerance) {
  if (!HaveGpu()) GTEST_SKIP() << "no CUDA build or no GPU";
#ifdef MOEMESH_HAVE_CUDA
  TempDir dir;
  GeneratorOptions o;
  o.config = GetParam().deepseek ? SmallDeepseekConfig(/*vocab=*/96, /*hidden=*/256)
                                 : SmallMixtralConfig(96, 256, 320, 2);
  o.seed = 5;
  o.dtype = GetParam().dtype;
  const std::string path = moemesh::testing::MakeModel(dir, "m", o);
  auto cfg = LoadModelConfig(path);
  ASSERT_TRUE(cfg.ok()) << cfg.status();
  auto ckpt = Checkpoint::Open(path);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  std::vector<ExpertKey> keys;
  for (int layer : cfg->MoeLayers()) {
    for (int e = 0; e < cfg->num_experts; ++e) keys.push_back({layer, e});
    if (cfg->n_shared_experts > 0) keys.push_back({layer, kSharedExpertId});
  }
  auto backend = MakeCpuBackend();
  auto cpu = LocalExpertGroup::Load(**ckpt, *cfg, keys, backend.get(), "cpu");
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  auto gpu = LocalExpertGroup::Load(**ckpt, *cfg, keys, backend.get(), "gpu");
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  auto dev = MakeCudaExperts(0, (*gpu)->DeviceWeights(), DeviceExpertsOptions{});
  ASSERT_TRUE(dev.ok()) << dev.status();
  (*gpu)->AttachDevice(*std::move(dev));

  const int64_t hidden = cfg->hidden_size;
  double worst = 0;
  for (int64_t n : {1, 3, 17, 64}) {
    for (int layer : cfg->MoeLayers()) {
      // n tokens taken from a larger shared tensor by row index, as the dispatcher sends them.
      auto b = std::make_shared<ExpertBatch>();
      b->layer = layer;
      b->tokens = Tensor::FromVector({2 * n, hidden}, RandomFloats(2 * n * hidden, n + layer));
      b->offsets.push_back(0);
      for (int64_t i = 0; i < n; ++i) {
        b->rows.push_back(static_cast<int32_t>((i * 7) % (2 * n)));
        for (int k = 0; k < cfg->top_k; ++k) {
          b->assignments.push_back(
              {static_cast<int32_t>((i * 3 + k * 5) % cfg->num_experts), 0.25f + 0.5f * k});
        }
        if (cfg->n_shared_experts > 0) b->assignments.push_back({kSharedExpertId, 1.0f});
        b->offsets.push_back(static_cast<int32_t>(b->assignments.size()));
      }
      // Progress on stderr (unbuffered), so a run that stops shows where.
      std::fprintf(stderr, "layer %d, %lld tokens: cpu", layer, static_cast<long long>(n));
      auto want = (*cpu)->Run(*b);
      ASSERT_TRUE(want.ok()) << want.status();
      std::fprintf(stderr, ", gpu");
      auto got = (*gpu)->Run(*b);
      ASSERT_TRUE(got.ok()) << got.status();
      std::fprintf(stderr, ", done\n");
      ASSERT_EQ(got->shape(), want->shape());
      for (int64_t i = 0; i < n; ++i) {
        double num = 0, den = 0;
        for (int64_t h = 0; h < hidden; ++h) {
          const double d = got->row(i)[h] - want->row(i)[h];
          num += d * d;
          den += static_cast<double>(want->row(i)[h]) * want->row(i)[h];
        }
        const double rel = std::sqrt(num / std::max(den, 1e-30));
        worst = std::max(worst, rel);
        EXPECT_LE(rel, GetParam().tol) << "layer " << layer << " n " << n << " token " << i;
      }
    }
  }
  std::printf("worst normwise relative error %.3g (tolerance %.3g), GEMMs %s\n", worst,
              GetParam().tol, (*gpu)->device()->gemm().c_str());

  // An expert the group does not hold is NOT_FOUND, as on the CPU.
  auto b = std::make_shared<ExpertBatch>();
  b->layer = 99;
  b->tokens = Tensor::FromVector({1, hidden}, RandomFloats(hidden, 1));
  b->offsets = {0, 1};
  b->assignments = {{0, 1.0f}};
  EXPECT_FALSE((*gpu)->Run(*b).ok());
#endif
}

INSTANTIATE_TEST_SUITE_P(Dtypes, GpuExpertGroupTest,
                         ::testing::Values(Case{DType::kF32, false, 1e-5},
                                           Case{DType::kBF16, false, 1.5e-2},
                                           Case{DType::kF8E4M3, true, 1.5e-2},
                                           Case{DType::kBF16, true, 1.5e-2}),
                         [](const ::testing::TestParamInfo<Case>& info) {
                           const char* d = info.param.dtype == DType::kF32    ? "f32"
                                           : info.param.dtype == DType::kBF16 ? "bf16"
                                                                              : "fp8";
                           return absl::StrCat(d, info.param.deepseek ? "_deepseek" : "_mixtral");
                         });

TEST(GpuWorkerMesh, LogitsAndGreedyTokensEqualTheEngine) {
  if (!HaveGpu()) GTEST_SKIP() << "no CUDA build or no GPU";
  TempDir dir;
  const std::string model = moemesh::testing::MakeSmallModel(dir);
  MeshOptions opts = moemesh::testing::TestMeshOptions(model, dir.Join("mesh"), /*groups=*/2);
  opts.worker_args.push_back("--backend=cuda");
  auto mesh = Mesh::Start(opts);
  ASSERT_TRUE(mesh.ok()) << mesh.status();
  auto gw = moemesh::testing::GatewayClient((*mesh)->gateway_address());
  auto m = InprocModel::Load(model);
  ASSERT_TRUE(m.ok()) << m.status();
  moemesh::testing::ExpectScoreMatchesEngine(gw.get(), *(*m)->engine, {5, 17, 42, 8, 1, 90});
  const std::vector<std::vector<int32_t>> prompts = {{1, 2, 3, 4}, {9, 8, 7}, {60}};
  const auto want = moemesh::testing::GenerateInproc(model, prompts, 12);
  for (size_t p = 0; p < prompts.size(); ++p) {
    auto got = moemesh::testing::GenerateViaGateway(gw.get(), prompts[p], 12);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(*got, want[p]) << "prompt " << p;
  }
}

}  // namespace
}  // namespace moemesh
