// Weights in their own dtype (issue 8, sections 1 and 4): BF16, F16 and FP8 checkpoints stay
// in their dtype in memory, and the engine's logits equal an F32 computation over the same
// dequantised weights (the checkpoint converted to F32 on load).
//
// The tolerance is zero for every dtype, and that is by design rather than luck: the kernels
// dequantise exactly (each BF16, F16 and E4M3 × block-scale value is an F32 value; the FP8
// product with its scale rounds once, as the F32 dequantisation does) and then run the same
// F32 operations in the same order as for F32 weights (services/compute/cpu/matmul.h). The
// issue's bound for FP8 (1e-3 relative to the dequantised reference) is therefore met with
// room; what a low-precision checkpoint loses is its quantisation, which no kernel can undo.
#include <cstring>
#include <vector>

#include "gtest/gtest.h"
#include "services/engine/inproc.h"
#include "tests/test_util.h"

namespace moemesh {
namespace {

using ::moemesh::testing::TempDir;

struct Case {
  DType dtype;
  bool deepseek;
};

class WeightsDTypeTest : public ::testing::TestWithParam<Case> {};

TEST_P(WeightsDTypeTest, LogitsEqualF32OverTheDequantisedWeightsAndBytesShrink) {
  TempDir dir;
  GeneratorOptions o;
  o.config = GetParam().deepseek ? SmallDeepseekConfig(/*vocab=*/96, /*hidden=*/128)
                                 : SmallMixtralConfig(96, 128, 192, 2);
  o.seed = 5;
  o.dtype = GetParam().dtype;
  const std::string path = moemesh::testing::MakeModel(dir, "m", o);
  auto native = InprocModel::Load(path);
  ASSERT_TRUE(native.ok()) << native.status();
  InprocOptions as_f32;
  as_f32.weights_dtype = DType::kF32;
  auto f32 = InprocModel::Load(path, as_f32);
  ASSERT_TRUE(f32.ok()) << f32.status();

  const std::vector<int32_t> tokens = {3, 14, 15, 92, 65, 35, 8, 9, 79};
  auto a = (*native)->engine->Score(tokens);
  auto b = (*f32)->engine->Score(tokens);
  ASSERT_TRUE(a.ok() && b.ok());
  ASSERT_EQ(a->numel(), b->numel());
  EXPECT_EQ(std::memcmp(a->data(), b->data(), a->numel() * sizeof(float)), 0);

  const double ratio = static_cast<double>((*native)->weight_bytes()) / (*f32)->weight_bytes();
  std::printf("%s weight bytes %lld vs F32 %lld: %.3f\n", std::string(DTypeName(o.dtype)).c_str(),
              static_cast<long long>((*native)->weight_bytes()),
              static_cast<long long>((*f32)->weight_bytes()), ratio);
  // Two-byte dtypes hold half of F32 (F32 norms aside); FP8 projections a quarter plus their
  // scales, with BF16 embeddings, norms and LM head as in DeepSeek-R1.
  EXPECT_LE(ratio, o.dtype == DType::kF8E4M3 ? 0.35 : 0.51);
}

INSTANTIATE_TEST_SUITE_P(All, WeightsDTypeTest,
                         ::testing::Values(Case{DType::kBF16, false}, Case{DType::kF16, false},
                                           Case{DType::kF8E4M3, false},
                                           Case{DType::kF8E4M3, true}),
                         [](const auto& info) {
                           std::string n(DTypeName(info.param.dtype));
                           for (char& c : n) c = c == '_' ? 'x' : c;
                           return (info.param.deepseek ? "DeepSeek_" : "Mixtral_") + n;
                         });

TEST(WeightsDTypeFlagTest, Parses) {
  EXPECT_FALSE(ParseWeightsDType("checkpoint")->has_value());
  EXPECT_FALSE(ParseWeightsDType("")->has_value());
  EXPECT_EQ(**ParseWeightsDType("bf16"), DType::kBF16);
  EXPECT_EQ(**ParseWeightsDType("f32"), DType::kF32);
  EXPECT_EQ(ParseWeightsDType("fp8").status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace moemesh
