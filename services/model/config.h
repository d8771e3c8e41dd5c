// ModelConfig: the architecture facts of a checkpoint, read from its config.json.
//
// One struct serves every architecture; where Mixtral and DeepSeek-V3 differ (gating
// function, shared experts, dense layers, tensor names) the difference is a field here or
// a function of it, never a copy of the engine. Values that moemesh cannot run are rejected
// at load with a message naming the field.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace moemesh {

enum class Arch { kMixtral, kDeepseekV3 };
enum class ScoringFunc { kSoftmax, kSigmoid };
// DeepSeek `topk_method`: kGreedy takes the top-k over all experts; kNoauxTc adds the
// score-correction bias and limits the choice to the best `topk_group` of `n_group` groups.
enum class TopkMethod { kGreedy, kNoauxTc };

struct ModelConfig {
  Arch arch = Arch::kMixtral;
  int vocab_size = 0;
  int hidden_size = 0;
  int intermediate_size = 0;      // Mixtral: expert FFN; DeepSeek: dense-layer FFN
  int moe_intermediate_size = 0;  // expert FFN width (Mixtral: = intermediate_size)
  int num_layers = 0;
  int num_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;  // hidden_size / num_heads unless config.json says otherwise
  float rms_norm_eps = 1e-5f;
  float rope_theta = 10000.0f;
  int max_position_embeddings = 4096;
  bool tie_word_embeddings = false;

  // Routing.
  int num_experts = 0;  // routed experts per MoE layer
  int top_k = 2;        // experts chosen per token
  ScoringFunc scoring = ScoringFunc::kSoftmax;
  bool norm_topk_prob = true;  // Mixtral renormalises its top-k softmax weights
  float routed_scaling_factor = 1.0f;
  int n_group = 1;
  int topk_group = 1;
  TopkMethod topk_method = TopkMethod::kGreedy;
  int n_shared_experts = 0;
  int first_k_dense_replace = 0;
  int moe_layer_freq = 1;
  // Multi-token-prediction layers stored after the last layer (DeepSeek-V3). Read and written
  // back, never loaded: plain decoding does not use them.
  int num_nextn_predict_layers = 0;

  // MLA attention (DeepSeek-V3). head_dim is then qk_nope_head_dim + qk_rope_head_dim.
  int q_lora_rank = 0;  // 0 (null in config.json): plain q_proj
  int kv_lora_rank = 0;
  int qk_nope_head_dim = 0;
  int qk_rope_head_dim = 0;
  int v_head_dim = 0;
  // YaRN rope scaling (`rope_scaling: {type: yarn, ...}`); factor 0 means none (null).
  float rope_factor = 0.0f;
  int rope_original_max_position = 0;
  float rope_beta_fast = 32.0f;
  float rope_beta_slow = 1.0f;
  float rope_mscale = 1.0f;
  float rope_mscale_all_dim = 0.0f;

  // FP8 block quantisation ([rows, cols] block), 0 when weights are not quantised.
  int fp8_block_rows = 0;
  int fp8_block_cols = 0;

  bool IsMoeLayer(int layer) const;
  std::vector<int> MoeLayers() const;
  bool IsMla() const { return arch == Arch::kDeepseekV3; }
  bool HasYarn() const { return rope_factor > 0.0f; }
};

// Checks the routing fields against each other (top-k within the experts that group limiting
// leaves, groups dividing the experts). INVALID_ARGUMENT naming the field. ParseModelConfig
// runs it; call it again after overriding top_k.
[[nodiscard]] absl::Status ValidateRouting(const ModelConfig& cfg);

// Parses config.json text. `source` names the file in error messages.
[[nodiscard]] absl::StatusOr<ModelConfig> ParseModelConfig(const std::string& json_text,
                                                           const std::string& source);
[[nodiscard]] absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& model_dir);
// config.json text in the Hugging Face layout of `cfg.arch`.
std::string ModelConfigToJson(const ModelConfig& cfg);

// Hugging Face tensor names of each architecture.
struct ExpertTensorNames {
  std::string gate;  // w1 / gate_proj: [inter, hidden]
  std::string up;    // w3 / up_proj:   [inter, hidden]
  std::string down;  // w2 / down_proj: [hidden, inter]
};
std::string LayerPrefix(int layer);
ExpertTensorNames RoutedExpertNames(const ModelConfig& cfg, int layer, int expert);
ExpertTensorNames SharedExpertNames(const ModelConfig& cfg, int layer);
ExpertTensorNames DenseMlpNames(const ModelConfig& cfg, int layer);
std::string GateWeightName(const ModelConfig& cfg, int layer);
std::string GateBiasName(const ModelConfig& cfg, int layer);

}  // namespace moemesh
