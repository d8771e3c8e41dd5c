// Tests of the DeepSeek-V3 architecture (issue 4), single process:
//   - gating: golden cases worked out by hand from DeepSeek-V3's inference/model.py Gate
//     (ties, group limiting that changes the choice, bias that changes the choice but not the
//     weights, -inf masking where HF's 0.0 masking would differ);
//   - config.json parsing of every DeepseekV3 field, R1's published config, and errors;
//   - FP8 E4M3 128x128 block dequantisation against hand values, and through Checkpoint;
//   - the engine against a plain reference forward pass written here, sharing no code with
//     the engine (it reads config.json itself and weights only through Checkpoint::LoadF32),
//     on generated 3-layer models (dense first layer, shared expert, q LoRA or plain q_proj,
//     YaRN on and off, F32/BF16/FP8);
//   - prefill-then-decode against full scoring, the latent KV cache size, and 1/2/4 local
//     expert groups giving the same logits.
#include <algorithm>
#include <cmath>
#include <fstream>
#include <functional>
#include <limits>
#include <numeric>
#include <ostream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "services/engine/engine.h"
#include "services/engine/inproc.h"
#include "services/model/config.h"
#include "services/model/fp8.h"
#include "services/model/generator.h"
#include "services/model/safetensors.h"
#include "services/moe/gating.h"
#include "tests/test_util.h"

namespace moemesh {
namespace {

using ::moemesh::testing::MaxAbsDiff;
using ::moemesh::testing::TempDir;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

constexpr float kInf = std::numeric_limits<float>::infinity();

// ---- gating: golden cases --------------------------------------------------------------------

RoutingConfig Rc(int experts, int k, int n_group = 1, int topk_group = 1, bool norm = true,
                 float scale = 1.0f) {
  RoutingConfig rc;
  rc.num_experts = experts;
  rc.top_k = k;
  rc.scoring = ScoringFunc::kSigmoid;
  rc.norm_topk_prob = norm;
  rc.routed_scaling_factor = scale;
  rc.n_group = n_group;
  rc.topk_group = topk_group;
  return rc;
}

struct Choice {
  std::vector<int32_t> ids;
  std::vector<float> weights;
};

Choice Select(const std::vector<float>& scores, const std::vector<float>* bias,
              const RoutingConfig& rc) {
  Choice c;
  c.ids.resize(rc.top_k);
  c.weights.resize(rc.top_k);
  GroupLimitedTopK(scores.data(), bias ? bias->data() : nullptr, rc, c.ids.data(),
                   c.weights.data());
  return c;
}

TEST(DeepseekGatingTest, PlainTopKNormalisesUnbiasedScores) {
  // 0.9 and 0.7 win; 0.9 / 1.6 = 0.5625, 0.7 / 1.6 = 0.4375.
  Choice c = Select({0.1f, 0.9f, 0.3f, 0.7f}, nullptr, Rc(4, 2));
  EXPECT_THAT(c.ids, ElementsAre(1, 3));
  EXPECT_FLOAT_EQ(c.weights[0], 0.5625f);
  EXPECT_FLOAT_EQ(c.weights[1], 0.4375f);
  // Without norm_topk_prob the raw scores, times routed_scaling_factor 2.5.
  c = Select({0.1f, 0.9f, 0.3f, 0.7f}, nullptr, Rc(4, 2, 1, 1, false, 2.5f));
  EXPECT_THAT(c.ids, ElementsAre(1, 3));
  EXPECT_FLOAT_EQ(c.weights[0], 2.25f);
  EXPECT_FLOAT_EQ(c.weights[1], 1.75f);
}

TEST(DeepseekGatingTest, TiesGoToTheLowerExpertAndGroup) {
  // Three experts tie at 0.5: the two lowest ids win, each with half the weight.
  Choice c = Select({0.5f, 0.5f, 0.5f, 0.2f}, nullptr, Rc(4, 2));
  EXPECT_THAT(c.ids, ElementsAre(0, 1));
  EXPECT_FLOAT_EQ(c.weights[0], 0.5f);
  EXPECT_FLOAT_EQ(c.weights[1], 0.5f);
  // Tie among later experts after a clear winner.
  c = Select({0.1f, 0.3f, 0.9f, 0.3f}, nullptr, Rc(4, 2));
  EXPECT_THAT(c.ids, ElementsAre(2, 1));
  // Group ties: groups {0,1} and {2,3} both sum (top-2, zero bias) to 1.0; one group kept:
  // group 0 (lower index), so experts 0 and 1 even though expert 3 has the best score.
  const std::vector<float> zero(4, 0.0f);
  c = Select({0.5f, 0.5f, 0.2f, 0.8f}, &zero, Rc(4, 2, 2, 1));
  EXPECT_THAT(c.ids, ElementsAre(0, 1));
}

TEST(DeepseekGatingTest, GroupLimitingChangesTheChosenExperts) {
  // 8 experts in 4 groups of 2; 2 groups kept; top-2; zero bias, so group score = top-2 sum.
  //   group 0: 0.90 0.10 -> 1.00
  //   group 1: 0.60 0.60 -> 1.20  kept
  //   group 2: 0.55 0.55 -> 1.10  kept
  //   group 3: 0.20 0.20 -> 0.40
  // Expert 0 has the best score but its group is dropped: experts 2 and 3 win, 0.5 each,
  // times routed_scaling_factor 2.5.
  const std::vector<float> s = {0.9f, 0.1f, 0.6f, 0.6f, 0.55f, 0.55f, 0.2f, 0.2f};
  const std::vector<float> zero(8, 0.0f);
  Choice c = Select(s, &zero, Rc(8, 2, 4, 2, true, 2.5f));
  EXPECT_THAT(c.ids, ElementsAre(2, 3));
  EXPECT_FLOAT_EQ(c.weights[0], 1.25f);
  EXPECT_FLOAT_EQ(c.weights[1], 1.25f);
  // Without group limiting (one group) expert 0 is chosen.
  c = Select(s, &zero, Rc(8, 2, 1, 1, true, 2.5f));
  EXPECT_THAT(c.ids, ElementsAre(0, 2));
  // Without a bias DeepSeek scores a group by its maximum: 0.9, 0.6, 0.55, 0.2 keeps groups 0
  // and 1, so experts 0 and 2: 0.9 / 1.5 = 0.6 and 0.6 / 1.5 = 0.4.
  c = Select(s, nullptr, Rc(8, 2, 4, 2));
  EXPECT_THAT(c.ids, ElementsAre(0, 2));
  EXPECT_FLOAT_EQ(c.weights[0], 0.6f);
  EXPECT_FLOAT_EQ(c.weights[1], 0.4f);
}

TEST(DeepseekGatingTest, BiasChangesSelectionButNotWeights) {
  // Biased: 0.8, 0.7, 0.9, 0.1 -> experts 2 and 0 are chosen (expert 1 would be without the
  // bias), and the weights come from the unbiased 0.6 and 0.8: 0.6/1.4 and 0.8/1.4.
  const std::vector<float> s = {0.8f, 0.7f, 0.6f, 0.1f};
  const std::vector<float> bias = {0.0f, 0.0f, 0.3f, 0.0f};
  Choice c = Select(s, &bias, Rc(4, 2));
  EXPECT_THAT(c.ids, ElementsAre(2, 0));
  EXPECT_FLOAT_EQ(c.weights[0], 0.6f / 1.4f);
  EXPECT_FLOAT_EQ(c.weights[1], 0.8f / 1.4f);
  c = Select(s, nullptr, Rc(4, 2));
  EXPECT_THAT(c.ids, ElementsAre(0, 1));
  // Unnormalised: the raw unbiased scores times the scaling factor.
  c = Select(s, &bias, Rc(4, 2, 1, 1, false, 2.0f));
  EXPECT_FLOAT_EQ(c.weights[0], 1.2f);
  EXPECT_FLOAT_EQ(c.weights[1], 1.6f);
}

TEST(DeepseekGatingTest, MasksWithMinusInfinityNotZero) {
  // Biased scores -0.9 -0.8 | 0.1 -1.6. Group sums -1.7 and -1.5: group 1 is kept. With -inf
  // masking the top-2 is {2, 3}. HF's 0.0 masking would give {2, 0}: a masked 0.0 beats -1.6.
  const std::vector<float> s = {0.1f, 0.2f, 0.3f, 0.4f};
  const std::vector<float> bias = {-1.0f, -1.0f, -0.2f, -2.0f};
  Choice c = Select(s, &bias, Rc(4, 2, 2, 1));
  EXPECT_THAT(c.ids, ElementsAre(2, 3));
  EXPECT_FLOAT_EQ(c.weights[0], 0.3f / 0.7f);
  EXPECT_FLOAT_EQ(c.weights[1], 0.4f / 0.7f);
}

TEST(DeepseekGatingTest, GateRoutesSigmoidAndGreedyAsConfigured) {
  // Identity gate weights make the logits equal to the hidden state.
  auto backend = MakeCpuBackend();
  const int e = 4;
  std::vector<float> eye(e * e, 0.0f);
  for (int i = 0; i < e; ++i) eye[i * e + i] = 1.0f;
  // sigmoid(logit) for these logits: 0.1, 0.2, 0.3, 0.4.
  std::vector<float> hidden;
  for (float p : {0.1f, 0.2f, 0.3f, 0.4f}) hidden.push_back(std::log(p / (1 - p)));
  ModelConfig cfg;
  cfg.arch = Arch::kDeepseekV3;
  cfg.num_experts = e;
  cfg.top_k = 2;
  cfg.scoring = ScoringFunc::kSigmoid;
  cfg.norm_topk_prob = true;
  cfg.routed_scaling_factor = 1.0f;
  cfg.n_group = 2;
  cfg.topk_group = 1;
  cfg.topk_method = TopkMethod::kNoauxTc;
  Gate noaux(RoutingConfig::From(cfg), Tensor::FromVector({e, e}, eye),
             Tensor::FromVector({e}, {-1.0f, -1.0f, -0.2f, -2.0f}));
  Routing r = noaux.Route(hidden.data(), 1, backend.get());
  EXPECT_THAT(r.ids, ElementsAre(2, 3));
  EXPECT_NEAR(r.weights[0], 0.3f / 0.7f, 1e-6);
  // greedy: no groups, no bias: experts 3 and 2 by score.
  cfg.topk_method = TopkMethod::kGreedy;
  Gate greedy(RoutingConfig::From(cfg), Tensor::FromVector({e, e}, eye),
              Tensor::FromVector({e}, {-1.0f, -1.0f, -0.2f, -2.0f}));
  r = greedy.Route(hidden.data(), 1, backend.get());
  EXPECT_THAT(r.ids, ElementsAre(3, 2));
  EXPECT_NEAR(r.weights[0], 0.4f / 0.7f, 1e-6);
  // Softmax scores with group limiting go through the same selection: logits 0, 0, 1, 2 -> the
  // group maxima keep group 1 only, weights softmax(1) : softmax(2) renormalised.
  cfg.topk_method = TopkMethod::kNoauxTc;
  cfg.scoring = ScoringFunc::kSoftmax;
  Gate soft(RoutingConfig::From(cfg), Tensor::FromVector({e, e}, eye), Tensor());
  const std::vector<float> logits = {0.0f, 0.0f, 1.0f, 2.0f};
  r = soft.Route(logits.data(), 1, backend.get());
  EXPECT_THAT(r.ids, ElementsAre(3, 2));
  EXPECT_NEAR(r.weights[0], std::exp(2.0) / (std::exp(1.0) + std::exp(2.0)), 1e-6);
}

// ---- config ----------------------------------------------------------------------------------

// DeepSeek-R1's published config.json (auto_map and training-only fields trimmed).
constexpr char kR1Config[] = R"({
  "architectures": ["DeepseekV3ForCausalLM"],
  "attention_bias": false, "attention_dropout": 0.0, "aux_loss_alpha": 0.001,
  "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1,
  "first_k_dense_replace": 3, "hidden_act": "silu", "hidden_size": 7168,
  "initializer_range": 0.02, "intermediate_size": 18432, "kv_lora_rank": 512,
  "max_position_embeddings": 163840, "model_type": "deepseek_v3",
  "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256,
  "n_shared_experts": 1, "norm_topk_prob": true, "num_attention_heads": 128,
  "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128,
  "num_nextn_predict_layers": 1, "pretraining_tp": 1, "q_lora_rank": 1536,
  "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
  "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                          "weight_block_size": [128, 128]},
  "rms_norm_eps": 1e-06,
  "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                   "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn"},
  "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": true,
  "tie_word_embeddings": false, "topk_group": 4, "topk_method": "noaux_tc",
  "torch_dtype": "bfloat16", "transformers_version": "4.46.3", "use_cache": true,
  "v_head_dim": 128, "vocab_size": 129280
})";

TEST(DeepseekConfigTest, ParsesR1) {
  absl::StatusOr<ModelConfig> c = ParseModelConfig(kR1Config, "r1");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->arch, Arch::kDeepseekV3);
  EXPECT_EQ(c->vocab_size, 129280);
  EXPECT_EQ(c->hidden_size, 7168);
  EXPECT_EQ(c->intermediate_size, 18432);
  EXPECT_EQ(c->moe_intermediate_size, 2048);
  EXPECT_EQ(c->num_layers, 61);
  EXPECT_EQ(c->num_heads, 128);
  EXPECT_EQ(c->num_experts, 256);
  EXPECT_EQ(c->top_k, 8);
  EXPECT_EQ(c->n_shared_experts, 1);
  EXPECT_EQ(c->first_k_dense_replace, 3);
  EXPECT_EQ(c->moe_layer_freq, 1);
  EXPECT_EQ(c->n_group, 8);
  EXPECT_EQ(c->topk_group, 4);
  EXPECT_EQ(c->topk_method, TopkMethod::kNoauxTc);
  EXPECT_EQ(c->scoring, ScoringFunc::kSigmoid);
  EXPECT_TRUE(c->norm_topk_prob);
  EXPECT_FLOAT_EQ(c->routed_scaling_factor, 2.5f);
  EXPECT_EQ(c->q_lora_rank, 1536);
  EXPECT_EQ(c->kv_lora_rank, 512);
  EXPECT_EQ(c->qk_nope_head_dim, 128);
  EXPECT_EQ(c->qk_rope_head_dim, 64);
  EXPECT_EQ(c->v_head_dim, 128);
  EXPECT_EQ(c->head_dim, 192);
  EXPECT_FLOAT_EQ(c->rope_theta, 10000.0f);
  EXPECT_FLOAT_EQ(c->rms_norm_eps, 1e-6f);
  EXPECT_EQ(c->max_position_embeddings, 163840);
  EXPECT_TRUE(c->HasYarn());
  EXPECT_FLOAT_EQ(c->rope_factor, 40.0f);
  EXPECT_EQ(c->rope_original_max_position, 4096);
  EXPECT_FLOAT_EQ(c->rope_beta_fast, 32.0f);
  EXPECT_FLOAT_EQ(c->rope_beta_slow, 1.0f);
  EXPECT_FLOAT_EQ(c->rope_mscale, 1.0f);
  EXPECT_FLOAT_EQ(c->rope_mscale_all_dim, 1.0f);
  EXPECT_EQ(c->fp8_block_rows, 128);
  EXPECT_EQ(c->fp8_block_cols, 128);
  EXPECT_EQ(c->num_nextn_predict_layers, 1);
  // 3 dense layers, then 58 MoE layers; the MTP layer (index 61) is not a layer of the model.
  EXPECT_FALSE(c->IsMoeLayer(2));
  EXPECT_TRUE(c->IsMoeLayer(3));
  EXPECT_EQ(c->MoeLayers().size(), 58u);

  // And back: ModelConfigToJson writes HF field names that parse to the same config.
  absl::StatusOr<ModelConfig> again = ParseModelConfig(ModelConfigToJson(*c), "round trip");
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(ModelConfigToJson(*again), ModelConfigToJson(*c));
  nlohmann::json j = nlohmann::json::parse(ModelConfigToJson(*c));
  EXPECT_EQ(j["architectures"][0], "DeepseekV3ForCausalLM");
  EXPECT_EQ(j["n_routed_experts"], 256);
  EXPECT_EQ(j["rope_scaling"]["type"], "yarn");
  EXPECT_EQ(j["rope_scaling"]["factor"], 40.0);
  EXPECT_EQ(j["rms_norm_eps"], 1e-6);
  EXPECT_EQ(j["quantization_config"]["weight_block_size"], nlohmann::json({128, 128}));
}

TEST(DeepseekConfigTest, NullQLoraAndNullRopeScaling) {
  nlohmann::json j = nlohmann::json::parse(kR1Config);
  j["q_lora_rank"] = nullptr;
  j["rope_scaling"] = nullptr;
  j.erase("quantization_config");
  absl::StatusOr<ModelConfig> c = ParseModelConfig(j.dump(), "v3-lite");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->q_lora_rank, 0);
  EXPECT_FALSE(c->HasYarn());
  EXPECT_EQ(c->fp8_block_rows, 0);
  nlohmann::json back = nlohmann::json::parse(ModelConfigToJson(*c));
  EXPECT_TRUE(back["q_lora_rank"].is_null());
  EXPECT_TRUE(back["rope_scaling"].is_null());
  EXPECT_FALSE(back.contains("quantization_config"));
}

TEST(DeepseekConfigTest, UnsupportedValuesNameTheField) {
  struct Case {
    const char* field;  // expected in the message
    std::function<void(nlohmann::json&)> edit;
  };
  const std::vector<Case> cases = {
      {"topk_method", [](auto& j) { j["topk_method"] = "group_limited_greedy"; }},
      {"scoring_func", [](auto& j) { j["scoring_func"] = "tanh"; }},
      {"n_group", [](auto& j) { j["n_routed_experts"] = 250; }},
      {"topk_group", [](auto& j) { j["topk_group"] = 9; }},
      {"num_experts_per_tok", [](auto& j) { j["num_experts_per_tok"] = 300; }},
      {"topk_group",
       [](auto& j) {
         j["topk_group"] = 1;
         j["num_experts_per_tok"] = 40;
       }},
      {"rope_scaling.type", [](auto& j) { j["rope_scaling"]["type"] = "linear"; }},
      {"factor", [](auto& j) { j["rope_scaling"].erase("factor"); }},
      {"original_max_position_embeddings",
       [](auto& j) { j["rope_scaling"].erase("original_max_position_embeddings"); }},
      {"quant_method", [](auto& j) { j["quantization_config"]["quant_method"] = "awq"; }},
      {"weight_block_size", [](auto& j) { j["quantization_config"]["weight_block_size"] = {128}; }},
      {"kv_lora_rank", [](auto& j) { j.erase("kv_lora_rank"); }},
      {"qk_rope_head_dim", [](auto& j) { j["qk_rope_head_dim"] = 63; }},
      {"q_lora_rank", [](auto& j) { j["q_lora_rank"] = -1; }},
      {"n_routed_experts", [](auto& j) { j.erase("n_routed_experts"); }},
      {"first_k_dense_replace", [](auto& j) { j["first_k_dense_replace"] = 62; }},
      {"moe_layer_freq", [](auto& j) { j["moe_layer_freq"] = 0; }},
      {"routed_scaling_factor", [](auto& j) { j["routed_scaling_factor"] = -1.0; }},
      {"hidden_act", [](auto& j) { j["hidden_act"] = "gelu"; }},
      {"attention_bias", [](auto& j) { j["attention_bias"] = true; }},
      {"moe_intermediate_size", [](auto& j) { j["moe_intermediate_size"] = "big"; }},
      // Numbers an int cannot hold (casting them is undefined behaviour; found by fuzz_config).
      {"kv_lora_rank", [](auto& j) { j["kv_lora_rank"] = 8.2e42; }},
      {"hidden_size", [](auto& j) { j["hidden_size"] = 4294967296ull; }},
      {"num_hidden_layers", [](auto& j) { j["num_hidden_layers"] = -3000000000ll; }},
      {"vocab_size", [](auto& j) { j["vocab_size"] = 1000.5; }},
      {"rms_norm_eps", [](auto& j) { j["rms_norm_eps"] = 1e300; }},
  };
  for (const Case& c : cases) {
    nlohmann::json j = nlohmann::json::parse(kR1Config);
    c.edit(j);
    absl::StatusOr<ModelConfig> r = ParseModelConfig(j.dump(), "cfg.json");
    ASSERT_FALSE(r.ok()) << c.field;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
    EXPECT_THAT(std::string(r.status().message()), HasSubstr(c.field)) << r.status();
    EXPECT_THAT(std::string(r.status().message()), HasSubstr("cfg.json")) << r.status();
  }
}

TEST(DeepseekConfigTest, TopKOverrideIsValidatedAgainstGroups) {
  absl::StatusOr<ModelConfig> c = ParseModelConfig(kR1Config, "r1");
  ASSERT_TRUE(c.ok());
  ModelConfig cfg = *c;
  EXPECT_TRUE(ApplyTopKOverride(16, &cfg).ok());
  EXPECT_EQ(cfg.top_k, 16);
  // 4 groups of 32 experts are kept: 129 cannot be chosen.
  absl::Status s = ApplyTopKOverride(129, &cfg);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(cfg.top_k, 16);
}

// ---- FP8 block dequantisation ----------------------------------------------------------------

TEST(Fp8Test, DequantisesBlocksByHand) {
  // A 3x3 weight in 2x2 blocks: scale_inv is [2, 2]; the last row/column are partial blocks.
  // E4M3 bytes: 0x38 = 1.0, 0x40 = 2.0, 0xB8 = -1.0, 0x30 = 0.5, 0x3C = 1.5, 0x00 = 0.
  const std::vector<uint8_t> w = {0x38, 0x40, 0xB8,  //
                                  0x30, 0x3C, 0x38,  //
                                  0x40, 0x00, 0x3C};
  const std::vector<float> scale = {2.0f, 0.5f,  //
                                    4.0f, 0.25f};
  std::vector<float> out(9);
  ASSERT_TRUE(
      DequantizeFp8Blocks(w, 3, 3, scale, std::vector<int64_t>{2, 2}, 2, 2, out.data()).ok());
  EXPECT_THAT(out, ElementsAre(2.0f, 4.0f, -0.5f,  //
                               1.0f, 3.0f, 0.5f,   //
                               8.0f, 0.0f, 0.375f));
  // A scale of the wrong shape is refused, naming both shapes.
  absl::Status s =
      DequantizeFp8Blocks(w, 3, 3, scale, std::vector<int64_t>{1, 4}, 2, 2, out.data());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("[2, 2]"));
}

TEST(Fp8Test, CheckpointDequantisesTransparently) {
  TempDir dir;
  // [130, 129] in 128x128 blocks: scale_inv [2, 2]; four elements, one per block, set by hand.
  const int64_t rows = 130, cols = 129;
  std::vector<uint8_t> w(rows * cols, 0x38);  // 1.0 everywhere
  w[0] = 0x40;                                // block (0,0): 2.0
  w[127 * cols + 128] = 0xB8;                 // block (0,1): -1.0
  w[128 * cols + 0] = 0x30;                   // block (1,0): 0.5
  w[129 * cols + 128] = 0x3C;                 // block (1,1): 1.5
  SafetensorsWriter wr;
  wr.AddRaw("x.weight", DType::kF8E4M3, {rows, cols}, w);
  wr.Add("x.weight_scale_inv", DType::kF32, {2, 2}, std::vector<float>{0.5f, 2.0f, 3.0f, 0.125f});
  wr.AddRaw("noscale.weight", DType::kF8E4M3, {2, 2}, {0x38, 0x38, 0x38, 0x38});
  wr.AddRaw("bad.weight", DType::kF8E4M3, {2, 2}, {0x38, 0x38, 0x38, 0x38});
  wr.Add("bad.weight_scale_inv", DType::kF32, {2, 1}, std::vector<float>{1.0f, 1.0f});
  ASSERT_TRUE(wr.Write(dir.Join("model.safetensors")).ok());
  auto ck = Checkpoint::Open(dir.path());
  ASSERT_TRUE(ck.ok()) << ck.status();
  absl::StatusOr<Tensor> t = (*ck)->LoadF32("x.weight", std::vector<int64_t>{rows, cols});
  ASSERT_TRUE(t.ok()) << t.status();
  auto at = [&](int64_t r, int64_t c) { return t->data()[r * cols + c]; };
  EXPECT_EQ(at(0, 0), 1.0f);         // 2.0 * 0.5
  EXPECT_EQ(at(0, 1), 0.5f);         // 1.0 * 0.5
  EXPECT_EQ(at(127, 128), -2.0f);    // -1.0 * 2
  EXPECT_EQ(at(5, 128), 2.0f);       // 1.0 * 2
  EXPECT_EQ(at(128, 0), 1.5f);       // 0.5 * 3
  EXPECT_EQ(at(129, 127), 3.0f);     // 1.0 * 3
  EXPECT_EQ(at(129, 128), 0.1875f);  // 1.5 * 0.125
  EXPECT_EQ(at(128, 128), 0.125f);   // 1.0 * 0.125

  absl::StatusOr<Tensor> missing = (*ck)->LoadF32("noscale.weight");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr("noscale.weight_scale_inv"));
  absl::StatusOr<Tensor> bad = (*ck)->LoadF32("bad.weight");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("bad.weight"));
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("[1, 1]"));
}

TEST(Fp8Test, QuantiseThenDequantiseIsCloseAndUsesFullRange) {
  const int64_t rows = 200, cols = 300;
  std::vector<float> w = testing::RandomFloats(rows * cols, 3, 0.05f);
  w[5] = 0.2f;  // one large value in block (0, 0)
  Fp8Blocks q = QuantizeFp8Blocks(w, rows, cols);
  EXPECT_THAT(q.scale_shape, ElementsAre(2, 3));
  EXPECT_FLOAT_EQ(q.scale_inv[0], 0.2f / 448.0f);
  EXPECT_EQ(F8E4M3ToFloat(q.data[5]), 448.0f);
  std::vector<float> back(rows * cols);
  ASSERT_TRUE(
      DequantizeFp8Blocks(q.data, rows, cols, q.scale_inv, q.scale_shape, 128, 128, back.data())
          .ok());
  for (int64_t i = 0; i < rows * cols; ++i) {
    // E4M3 keeps 3 mantissa bits: relative error at most 2^-4 for normal values.
    EXPECT_NEAR(back[i], w[i], std::fabs(w[i]) / 16 + 1e-5) << i;
  }
}

// ---- a reference forward pass that shares no code with the engine ----------------------------

// Reads config.json with nlohmann::json and weights with Checkpoint::LoadF32; computes in
// double; attention expands the latent to per-head keys and values (the "naive" form of
// DeepSeek's model.py) where the engine absorbs kv_b_proj.
class Reference {
 public:
  explicit Reference(const std::string& dir) {
    std::ifstream in(dir + "/config.json");
    j_ = nlohmann::json::parse(in);
    auto ck = Checkpoint::Open(dir);
    EXPECT_TRUE(ck.ok()) << ck.status();
    ck_ = std::move(*ck);
    if (j_.contains("quantization_config")) {
      ck_->set_fp8_block(j_["quantization_config"]["weight_block_size"][0],
                         j_["quantization_config"]["weight_block_size"][1]);
    }
    h_ = j_["hidden_size"];
    nh_ = j_["num_attention_heads"];
    ql_ = j_["q_lora_rank"].is_null() ? 0 : j_["q_lora_rank"].get<int>();
    kvl_ = j_["kv_lora_rank"];
    nope_ = j_["qk_nope_head_dim"];
    rope_ = j_["qk_rope_head_dim"];
    vd_ = j_["v_head_dim"];
    eps_ = j_["rms_norm_eps"];
    // Frequencies of the rotated dims: theta^(-2i/d), YaRN-corrected (HF's
    // DeepseekV3YarnRotaryEmbedding) when rope_scaling is set.
    const double theta = j_["rope_theta"];
    for (int i = 0; i < rope_ / 2; ++i) freq_.push_back(std::pow(theta, -2.0 * i / rope_));
    scale_ = 1.0 / std::sqrt(static_cast<double>(nope_ + rope_));
    if (!j_["rope_scaling"].is_null()) {
      const auto& rs = j_["rope_scaling"];
      const double f = rs["factor"], orig = rs["original_max_position_embeddings"];
      const double bf = rs["beta_fast"], bs = rs["beta_slow"];
      const double ms = rs["mscale"], msa = rs["mscale_all_dim"];
      auto dim_for = [&](double rot) {
        return rope_ * std::log(orig / (rot * 2 * 3.14159265358979323846)) / (2 * std::log(theta));
      };
      const double lo = std::max(0.0, std::floor(dim_for(bf)));
      double hi = std::min<double>(rope_ - 1, std::ceil(dim_for(bs)));
      if (hi == lo) hi += 0.001;
      for (int i = 0; i < rope_ / 2; ++i) {
        const double ramp = std::min(1.0, std::max(0.0, (i - lo) / (hi - lo)));
        const double extrapolate = 1.0 - ramp;  // weight of the original frequency
        freq_[i] = extrapolate * freq_[i] + (1.0 - extrapolate) * freq_[i] / f;
      }
      auto m = [&](double s) { return f <= 1 ? 1.0 : 0.1 * s * std::log(f) + 1.0; };
      cos_sin_scale_ = m(ms) / m(msa);
      if (msa != 0) scale_ *= m(msa) * m(msa);
    }
  }

  // Logits [n, vocab] of every position.
  std::vector<double> Forward(const std::vector<int32_t>& tokens) {
    const int n = static_cast<int>(tokens.size());
    const Tensor emb = W("model.embed_tokens.weight");
    std::vector<double> x(n * h_);
    for (int i = 0; i < n; ++i)
      for (int d = 0; d < h_; ++d) x[i * h_ + d] = emb.data()[tokens[i] * h_ + d];
    const int layers = j_["num_hidden_layers"];
    for (int l = 0; l < layers; ++l) {
      const std::string p = absl::StrCat("model.layers.", l, ".");
      std::vector<double> xn = Norm(x, n, h_, W(p + "input_layernorm.weight"), eps_);
      std::vector<double> a = Attention(p + "self_attn.", xn, n);
      for (size_t i = 0; i < x.size(); ++i) x[i] += a[i];
      xn = Norm(x, n, h_, W(p + "post_attention_layernorm.weight"), eps_);
      std::vector<double> f = Ffn(p, l, xn, n);
      for (size_t i = 0; i < x.size(); ++i) x[i] += f[i];
    }
    std::vector<double> xn = Norm(x, n, h_, W("model.norm.weight"), eps_);
    return Linear(xn, n, W("lm_head.weight"));
  }

 private:
  Tensor W(const std::string& name) {
    absl::StatusOr<Tensor> t = ck_->LoadF32(name);
    EXPECT_TRUE(t.ok()) << t.status();
    return t.ok() ? *t : Tensor();
  }
  // y[r, o] = Σ_i x[r, i] w[o, i].
  static std::vector<double> Linear(const std::vector<double>& x, int rows, const Tensor& w) {
    const int64_t out = w.dim(0), in = w.dim(1);
    EXPECT_EQ(static_cast<int64_t>(x.size()), rows * in);
    std::vector<double> y(rows * out, 0.0);
    for (int r = 0; r < rows; ++r)
      for (int64_t o = 0; o < out; ++o) {
        double s = 0;
        for (int64_t i = 0; i < in; ++i) s += x[r * in + i] * w.data()[o * in + i];
        y[r * out + o] = s;
      }
    return y;
  }
  static std::vector<double> Norm(const std::vector<double>& x, int rows, int dim, const Tensor& w,
                                  double eps) {
    std::vector<double> y(x.size());
    for (int r = 0; r < rows; ++r) {
      double ss = 0;
      for (int d = 0; d < dim; ++d) ss += x[r * dim + d] * x[r * dim + d];
      const double inv = 1.0 / std::sqrt(ss / dim + eps);
      for (int d = 0; d < dim; ++d) y[r * dim + d] = x[r * dim + d] * inv * w.data()[d];
    }
    return y;
  }
  // Rotates adjacent pairs (2i, 2i+1) of v[0 .. rope) by pos * freq[i] (view_as_complex).
  void Rotate(double* v, int pos) const {
    for (int i = 0; i < rope_ / 2; ++i) {
      const double c = std::cos(pos * freq_[i]) * cos_sin_scale_,
                   s = std::sin(pos * freq_[i]) * cos_sin_scale_;
      const double re = v[2 * i], im = v[2 * i + 1];
      v[2 * i] = re * c - im * s;
      v[2 * i + 1] = re * s + im * c;
    }
  }
  std::vector<double> Attention(const std::string& p, const std::vector<double>& xn, int n) {
    const int qk = nope_ + rope_;
    std::vector<double> q;
    if (ql_ > 0) {
      std::vector<double> qa = Linear(xn, n, W(p + "q_a_proj.weight"));
      qa = Norm(qa, n, ql_, W(p + "q_a_layernorm.weight"), 1e-6);
      q = Linear(qa, n, W(p + "q_b_proj.weight"));
    } else {
      q = Linear(xn, n, W(p + "q_proj.weight"));
    }
    const std::vector<double> kva = Linear(xn, n, W(p + "kv_a_proj_with_mqa.weight"));
    std::vector<double> latent(n * kvl_), kpe(n * rope_);
    for (int i = 0; i < n; ++i) {
      for (int d = 0; d < kvl_; ++d) latent[i * kvl_ + d] = kva[i * (kvl_ + rope_) + d];
      for (int d = 0; d < rope_; ++d) kpe[i * rope_ + d] = kva[i * (kvl_ + rope_) + kvl_ + d];
      Rotate(&kpe[i * rope_], i);
      for (int hd = 0; hd < nh_; ++hd) Rotate(&q[(i * nh_ + hd) * qk + nope_], i);
    }
    latent = Norm(latent, n, kvl_, W(p + "kv_a_layernorm.weight"), 1e-6);
    const std::vector<double> kv = Linear(latent, n, W(p + "kv_b_proj.weight"));  // [n, nh, nope+v]
    std::vector<double> o(n * nh_ * vd_, 0.0);
    for (int hd = 0; hd < nh_; ++hd) {
      for (int i = 0; i < n; ++i) {
        std::vector<double> s(i + 1);
        double mx = -1e300;
        for (int t = 0; t <= i; ++t) {
          const double* qi = &q[(i * nh_ + hd) * qk];
          const double* kt = &kv[(t * nh_ + hd) * (nope_ + vd_)];
          double dot = 0;
          for (int d = 0; d < nope_; ++d) dot += qi[d] * kt[d];
          for (int d = 0; d < rope_; ++d) dot += qi[nope_ + d] * kpe[t * rope_ + d];
          s[t] = dot * scale_;
          mx = std::max(mx, s[t]);
        }
        double z = 0;
        for (double& v : s) z += (v = std::exp(v - mx));
        for (int t = 0; t <= i; ++t) {
          const double* vt = &kv[(t * nh_ + hd) * (nope_ + vd_) + nope_];
          for (int d = 0; d < vd_; ++d) o[(i * nh_ + hd) * vd_ + d] += s[t] / z * vt[d];
        }
      }
    }
    return Linear(o, n, W(p + "o_proj.weight"));
  }
  static std::vector<double> Mlp(const std::vector<double>& x, int n, const Tensor& g,
                                 const Tensor& u, const Tensor& d) {
    std::vector<double> a = Linear(x, n, g), b = Linear(x, n, u);
    for (size_t i = 0; i < a.size(); ++i) a[i] = a[i] / (1.0 + std::exp(-a[i])) * b[i];
    return Linear(a, n, d);
  }
  std::vector<double> Ffn(const std::string& p, int l, const std::vector<double>& xn, int n) {
    const int first_dense = j_["first_k_dense_replace"], freq = j_["moe_layer_freq"];
    if (l < first_dense || l % freq != 0) {
      return Mlp(xn, n, W(p + "mlp.gate_proj.weight"), W(p + "mlp.up_proj.weight"),
                 W(p + "mlp.down_proj.weight"));
    }
    const int e = j_["n_routed_experts"], k = j_["num_experts_per_tok"];
    const bool noaux = j_["topk_method"] == "noaux_tc";
    const int groups = noaux ? j_["n_group"].get<int>() : 1;
    const int keep_groups = noaux ? j_["topk_group"].get<int>() : 1;
    const bool sigmoid = j_["scoring_func"] == "sigmoid";
    const bool norm = j_["norm_topk_prob"];
    const double scaling = j_["routed_scaling_factor"];
    const std::vector<double> logits = Linear(xn, n, W(p + "mlp.gate.weight"));
    std::vector<double> bias(e, 0.0);
    const bool has_bias = noaux && ck_->Has(p + "mlp.gate.e_score_correction_bias");
    if (has_bias) {
      Tensor b = W(p + "mlp.gate.e_score_correction_bias");
      for (int i = 0; i < e; ++i) bias[i] = b.data()[i];
    }
    std::vector<double> y(n * h_, 0.0);
    for (int i = 0; i < n; ++i) {
      std::vector<double> score(e);
      double z = 0, mx = *std::max_element(&logits[i * e], &logits[i * e] + e);
      for (int x = 0; x < e; ++x) {
        score[x] =
            sigmoid ? 1.0 / (1.0 + std::exp(-logits[i * e + x])) : std::exp(logits[i * e + x] - mx);
        z += score[x];
      }
      if (!sigmoid)
        for (double& s : score) s /= z;
      std::vector<double> choice(e);
      for (int x = 0; x < e; ++x) choice[x] = score[x] + bias[x];
      // Group limiting: rank groups by the sum of their best two (by the best one without bias).
      const int per = e / groups;
      std::vector<std::pair<double, int>> granks;
      for (int g = 0; g < groups; ++g) {
        std::vector<double> v(choice.begin() + g * per, choice.begin() + (g + 1) * per);
        std::sort(v.rbegin(), v.rend());
        granks.push_back({has_bias ? v[0] + (per > 1 ? v[1] : 0.0) : v[0], -g});
      }
      std::sort(granks.rbegin(), granks.rend());  // best first; lower group first on ties
      std::vector<bool> kept(groups, false);
      for (int g = 0; g < keep_groups; ++g) kept[-granks[g].second] = true;
      std::vector<std::pair<double, int>> cands;
      for (int x = 0; x < e; ++x)
        if (kept[x / per]) cands.push_back({choice[x], -x});
      std::sort(cands.rbegin(), cands.rend());
      double sum = 0;
      for (int j = 0; j < k; ++j) sum += score[-cands[j].second];
      std::vector<double> row(xn.begin() + i * h_, xn.begin() + (i + 1) * h_);
      for (int j = 0; j < k; ++j) {
        const int x = -cands[j].second;
        const double w = (norm ? score[x] / sum : score[x]) * scaling;
        const std::string ep = absl::StrCat(p, "mlp.experts.", x, ".");
        std::vector<double> out = Mlp(row, 1, W(ep + "gate_proj.weight"), W(ep + "up_proj.weight"),
                                      W(ep + "down_proj.weight"));
        for (int d = 0; d < h_; ++d) y[i * h_ + d] += w * out[d];
      }
    }
    if (j_["n_shared_experts"].get<int>() > 0) {
      const std::string sp = p + "mlp.shared_experts.";
      std::vector<double> s = Mlp(xn, n, W(sp + "gate_proj.weight"), W(sp + "up_proj.weight"),
                                  W(sp + "down_proj.weight"));
      for (size_t i = 0; i < y.size(); ++i) y[i] += s[i];
    }
    return y;
  }

  nlohmann::json j_;
  std::unique_ptr<Checkpoint> ck_;
  int h_, nh_, ql_, kvl_, nope_, rope_, vd_;
  double eps_, scale_ = 1, cos_sin_scale_ = 1;
  std::vector<double> freq_;
};

double MaxDiff(const std::vector<double>& ref, const Tensor& t) {
  EXPECT_EQ(static_cast<int64_t>(ref.size()), t.numel());
  double m = 0;
  for (size_t i = 0; i < ref.size() && i < static_cast<size_t>(t.numel()); ++i) {
    const double d = std::fabs(ref[i] - t.data()[i]);
    if (std::isnan(d)) return INFINITY;
    m = std::max(m, d);
  }
  return m;
}

std::vector<int32_t> Tokens(int n, int vocab, uint64_t seed) {
  std::vector<float> r = testing::RandomFloats(n, seed, 1.0f);
  std::vector<int32_t> t;
  for (float x : r) t.push_back(static_cast<int32_t>((x + 1.0f) * 0.5f * (vocab - 1)));
  return t;
}

struct Variant {
  std::string name;
  std::function<void(GeneratorOptions&)> edit;
};
void PrintTo(const Variant& v, std::ostream* os) { *os << v.name; }

std::vector<Variant> Variants() {
  return {
      {"qlora_noyarn_f32", [](GeneratorOptions&) {}},
      {"nullq_yarn_f32",
       [](GeneratorOptions& o) {
         o.config.q_lora_rank = 0;
         o.config.qk_rope_head_dim = 16;
         o.config.rope_factor = 4.0f;
         o.config.rope_original_max_position = 64;
         o.config.rope_mscale = 1.0f;
         o.config.rope_mscale_all_dim = 1.0f;
       }},
      {"qlora_yarn_mscale_ratio_f32",
       [](GeneratorOptions& o) {
         o.config.qk_rope_head_dim = 16;
         o.config.rope_factor = 8.0f;
         o.config.rope_original_max_position = 32;
         o.config.rope_beta_fast = 16.0f;
         o.config.rope_beta_slow = 2.0f;
         o.config.rope_mscale = 1.0f;
         o.config.rope_mscale_all_dim = 0.707f;
       }},
      {"two_shared_freq2_bf16",
       [](GeneratorOptions& o) {
         o.dtype = DType::kBF16;
         o.config.n_shared_experts = 2;
         o.config.moe_layer_freq = 2;
         o.config.first_k_dense_replace = 0;
       }},
      {"greedy_softmax_f32",
       [](GeneratorOptions& o) {
         o.config.topk_method = TopkMethod::kGreedy;
         o.config.scoring = ScoringFunc::kSoftmax;
         o.config.norm_topk_prob = false;
         o.config.routed_scaling_factor = 1.0f;
         o.config.top_k = 3;
       }},
      {"fp8_yarn",
       [](GeneratorOptions& o) {
         o.dtype = DType::kF8E4M3;
         o.config.rope_factor = 40.0f;
         o.config.rope_original_max_position = 100;
       }},
  };
}

GeneratorOptions BaseOptions() {
  GeneratorOptions o;
  o.config = SmallDeepseekConfig(96, 64, 3);
  o.config.max_position_embeddings = 512;
  o.seed = 11;
  return o;
}

class DeepseekEngineTest : public ::testing::TestWithParam<Variant> {};

TEST_P(DeepseekEngineTest, MatchesReferenceForward) {
  TempDir dir;
  GeneratorOptions o = BaseOptions();
  GetParam().edit(o);
  const std::string path = testing::MakeModel(dir, "m", o);
  auto m = InprocModel::Load(path);
  ASSERT_TRUE(m.ok()) << m.status();
  const std::vector<int32_t> tokens = Tokens(12, o.config.vocab_size, 5);
  absl::StatusOr<Tensor> logits = (*m)->engine->Score(tokens);
  ASSERT_TRUE(logits.ok()) << logits.status();
  Reference ref(path);
  const std::vector<double> want = ref.Forward(tokens);
  const double diff = MaxDiff(want, *logits);
  EXPECT_LE(diff, 1e-4) << GetParam().name;
  RecordProperty("max_abs_diff", absl::StrCat(diff));
  // The logits are not degenerate: distinct tokens get clearly different logits.
  double spread = 0;
  for (double v : want) spread = std::max(spread, std::fabs(v));
  EXPECT_GT(spread, 1.0);
}

TEST_P(DeepseekEngineTest, PrefillThenDecodeEqualsScoring) {
  TempDir dir;
  GeneratorOptions o = BaseOptions();
  GetParam().edit(o);
  auto m = InprocModel::Load(testing::MakeModel(dir, "m", o));
  ASSERT_TRUE(m.ok()) << m.status();
  Engine& e = *(*m)->engine;
  const std::vector<int32_t> tokens = Tokens(10, o.config.vocab_size, 9);
  absl::StatusOr<Tensor> full = e.Score(tokens);
  ASSERT_TRUE(full.ok()) << full.status();
  const int64_t v = o.config.vocab_size;
  // Sequence A: prefill 4, then decode one by one; sequence B (other tokens) shares the steps.
  auto a = e.NewSequence();
  auto b = e.NewSequence();
  const std::vector<int32_t> other = Tokens(10, o.config.vocab_size, 10);
  std::vector<StepInput> in = {{a.get(), absl::MakeConstSpan(tokens.data(), 4), true},
                               {b.get(), absl::MakeConstSpan(other.data(), 1), false}};
  absl::StatusOr<std::vector<Tensor>> r = e.Step(in);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_LE(MaxAbsDiff((*r)[0].data(), full->data(), 4 * v), 1e-4);
  for (size_t i = 4; i < tokens.size(); ++i) {
    std::vector<StepInput> step = {{a.get(), absl::MakeConstSpan(&tokens[i], 1), false},
                                   {b.get(), absl::MakeConstSpan(&other[i - 3], 1), false}};
    r = e.Step(step);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_LE(MaxAbsDiff((*r)[0].data(), full->row(static_cast<int64_t>(i)), v), 1e-4)
        << "position " << i;
  }
  EXPECT_EQ(a->length(), 10);
  EXPECT_EQ(b->length(), 7);
}

INSTANTIATE_TEST_SUITE_P(Variants, DeepseekEngineTest, ::testing::ValuesIn(Variants()),
                         [](const auto& info) { return info.param.name; });

TEST(DeepseekModelTest, CacheHoldsOnlyTheLatent) {
  TempDir dir;
  GeneratorOptions o = BaseOptions();
  auto m = InprocModel::Load(testing::MakeModel(dir, "m", o));
  ASSERT_TRUE(m.ok()) << m.status();
  Engine& e = *(*m)->engine;
  const int64_t per = o.config.kv_lora_rank + o.config.qk_rope_head_dim;  // 32 + 8
  EXPECT_EQ(e.cache_floats_per_token_per_layer(), per);
  auto seq = e.NewSequence();
  const std::vector<int32_t> tokens = Tokens(7, o.config.vocab_size, 1);
  StepInput in{seq.get(), tokens, false};
  ASSERT_TRUE(e.Step({&in, 1}).ok());
  EXPECT_EQ(seq->cache_floats(), seq->capacity() * o.config.num_layers * per);
  // Expanded per-head K and V would be heads * (qk_nope + qk_rope + v_head) = 4 * 40 floats.
  EXPECT_LT(per, o.config.num_heads *
                     (o.config.qk_nope_head_dim + o.config.qk_rope_head_dim + o.config.v_head_dim));
}

// The engine's per-stage profile (bench_engine's table, the gateway's
// moemesh_gateway_stage_seconds_total): every stage of a model with a dense first layer takes
// time, and the stages, the MoE wait and the rest add up to the wall time.
TEST(DeepseekModelTest, StepProfileAccountsForEveryStage) {
  TempDir dir;
  GeneratorOptions o = BaseOptions();
  ASSERT_EQ(o.config.first_k_dense_replace, 1);
  auto m = InprocModel::Load(testing::MakeModel(dir, "m", o));
  ASSERT_TRUE(m.ok()) << m.status();
  Engine& e = *(*m)->engine;
  const StepProfile before = e.profile();
  EXPECT_EQ(before.steps, 0);
  EXPECT_EQ(before.attention_s + before.moe_call_s + before.dense_ffn_s + before.lm_head_s, 0);
  auto seq = e.NewSequence();
  const std::vector<int32_t> tokens = Tokens(9, o.config.vocab_size, 3);
  StepInput in{seq.get(), tokens, false};
  ASSERT_TRUE(e.Step({&in, 1}).ok());
  const int32_t next = 5;
  StepInput d{seq.get(), absl::MakeConstSpan(&next, 1), false};
  ASSERT_TRUE(e.Step({&d, 1}).ok());
  const StepProfile p = e.profile();
  EXPECT_EQ(p.steps, 2);
  EXPECT_GT(p.attention_s, 0);
  EXPECT_GT(p.moe_call_s, 0);
  EXPECT_GT(p.dense_ffn_s, 0);
  EXPECT_GT(p.lm_head_s, 0);
  EXPECT_GE(p.other_s(), 0);
  EXPECT_LE(p.attention_s + p.moe_call_s + p.dense_ffn_s + p.lm_head_s + p.moe_wait_s, p.wall_s);
  // A failed step still adds its wall time, and never a negative remainder.
  const int32_t bad = static_cast<int32_t>(o.config.vocab_size);
  StepInput b{seq.get(), absl::MakeConstSpan(&bad, 1), false};
  EXPECT_FALSE(e.Step({&b, 1}).ok());
  EXPECT_GE(e.profile().other_s(), 0);
}

TEST(DeepseekModelTest, YarnSoftmaxScaleByHand) {
  TempDir dir;
  GeneratorOptions o = BaseOptions();
  o.config.rope_factor = 40.0f;
  o.config.rope_original_max_position = 64;
  o.config.rope_mscale = 1.0f;
  o.config.rope_mscale_all_dim = 1.0f;  // as R1
  auto m = InprocModel::Load(testing::MakeModel(dir, "m", o));
  ASSERT_TRUE(m.ok()) << m.status();
  // (16 + 8)^-0.5 * (0.1 * ln 40 + 1)^2 = 0.2041241 * 1.3688879^2 = 0.3824989.
  EXPECT_NEAR((*m)->engine->attention_scale(), 0.3824989, 1e-6);
  // mscale_all_dim 0 (absent): HF leaves the softmax scale alone.
  o.config.rope_mscale_all_dim = 0.0f;
  auto no_all_dim = InprocModel::Load(testing::MakeModel(dir, "m0", o));
  ASSERT_TRUE(no_all_dim.ok());
  EXPECT_NEAR((*no_all_dim)->engine->attention_scale(), 0.2041241, 1e-6);
  o.config.rope_factor = 0.0f;
  auto plain = InprocModel::Load(testing::MakeModel(dir, "plain", o));
  ASSERT_TRUE(plain.ok());
  EXPECT_NEAR((*plain)->engine->attention_scale(), 0.2041241, 1e-6);
}

TEST(DeepseekModelTest, GroupsGiveTheSameLogits) {
  TempDir dir;
  GeneratorOptions o = BaseOptions();
  const std::string path = testing::MakeModel(dir, "m", o);
  const std::vector<int32_t> tokens = Tokens(9, o.config.vocab_size, 2);
  Tensor base;
  for (int groups : {1, 2, 4}) {
    auto m = InprocModel::Load(path, InprocOptions{groups, 0, std::nullopt});
    ASSERT_TRUE(m.ok()) << m.status();
    absl::StatusOr<Tensor> l = (*m)->engine->Score(tokens);
    ASSERT_TRUE(l.ok()) << l.status();
    if (groups == 1) {
      base = *l;
    } else {
      EXPECT_LE(MaxAbsDiff(base.data(), l->data(), base.numel()), 1e-4) << groups << " groups";
    }
  }
}

TEST(DeepseekModelTest, MultiTokenPredictionLayersAreNotLoaded) {
  TempDir dir;
  GeneratorOptions o = BaseOptions();
  const std::string plain = testing::MakeModel(dir, "plain", o);
  o.config.num_nextn_predict_layers = 1;
  const std::string mtp = testing::MakeModel(dir, "mtp", o);
  auto ck = Checkpoint::Open(mtp);
  ASSERT_TRUE(ck.ok());
  EXPECT_TRUE((*ck)->Has("model.layers.3.eh_proj.weight"));
  auto a = InprocModel::Load(plain);
  auto b = InprocModel::Load(mtp);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(b->get()->config.num_nextn_predict_layers, 1);
  const std::vector<int32_t> tokens = Tokens(5, o.config.vocab_size, 4);
  absl::StatusOr<Tensor> la = (*a)->engine->Score(tokens), lb = (*b)->engine->Score(tokens);
  ASSERT_TRUE(la.ok() && lb.ok());
  EXPECT_EQ(MaxAbsDiff(la->data(), lb->data(), la->numel()), 0.0);
}

TEST(DeepseekModelTest, GeneratedTensorNamesAndDtypes) {
  TempDir dir;
  GeneratorOptions o = BaseOptions();
  o.dtype = DType::kF8E4M3;
  auto ck = Checkpoint::Open(testing::MakeModel(dir, "m", o));
  ASSERT_TRUE(ck.ok());
  auto dtype = [&](const std::string& n) {
    absl::StatusOr<TensorInfo> i = (*ck)->Info(n);
    EXPECT_TRUE(i.ok()) << n << ": " << i.status();
    return i.ok() ? i->dtype : DType::kF32;
  };
  for (const char* n : {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"}) {
    EXPECT_EQ(dtype(absl::StrCat("model.layers.1.self_attn.", n, ".weight")), DType::kF8E4M3) << n;
    EXPECT_EQ(dtype(absl::StrCat("model.layers.1.self_attn.", n, ".weight_scale_inv")), DType::kF32)
        << n;
  }
  EXPECT_EQ(dtype("model.layers.1.self_attn.q_a_layernorm.weight"), DType::kBF16);
  EXPECT_EQ(dtype("model.layers.1.self_attn.kv_a_layernorm.weight"), DType::kBF16);
  EXPECT_EQ(dtype("model.layers.0.mlp.gate_proj.weight"), DType::kF8E4M3);  // dense layer
  EXPECT_EQ(dtype("model.layers.1.mlp.gate.weight"), DType::kBF16);
  EXPECT_EQ(dtype("model.layers.1.mlp.gate.e_score_correction_bias"), DType::kF32);
  EXPECT_EQ(dtype("model.layers.1.mlp.experts.7.down_proj.weight"), DType::kF8E4M3);
  EXPECT_EQ(dtype("model.layers.1.mlp.shared_experts.up_proj.weight"), DType::kF8E4M3);
  EXPECT_EQ(dtype("model.embed_tokens.weight"), DType::kBF16);
  EXPECT_EQ(dtype("lm_head.weight"), DType::kBF16);
  EXPECT_FALSE((*ck)->Has("model.layers.0.mlp.gate.weight"));  // dense: no router
  auto cfg = LoadModelConfig((*ck)->dir());
  ASSERT_TRUE(cfg.ok()) << cfg.status();
  EXPECT_EQ(cfg->fp8_block_rows, 128);
}

}  // namespace
}  // namespace moemesh
