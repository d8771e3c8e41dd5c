#include "services/model/config.h"

#include <fstream>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"
#include "services/common/status_macros.h"

namespace moemesh {
namespace {

using json = nlohmann::json;

// Reads `key` into `out` when present and not null; type errors name the key.
template <typename T>
absl::Status Get(const json& j, const char* key, T* out, const std::string& source,
                 bool required = false) {
  if (!j.contains(key) || j[key].is_null()) {
    if (required) return absl::InvalidArgumentError(absl::StrCat(source, ": missing '", key, "'"));
    return absl::OkStatus();
  }
  try {
    *out = j[key].get<T>();
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": field '", key, "': ", e.what()));
  }
  return absl::OkStatus();
}

absl::Status Positive(int v, const char* key, const std::string& source) {
  if (v <= 0) return absl::InvalidArgumentError(absl::StrCat(source, ": '", key, "' must be positive, got ", v));
  return absl::OkStatus();
}

}  // namespace

bool ModelConfig::IsMoeLayer(int layer) const {
  if (num_experts <= 0) return false;
  if (layer < first_k_dense_replace) return false;
  return moe_layer_freq <= 1 || layer % moe_layer_freq == 0;
}

std::vector<int> ModelConfig::MoeLayers() const {
  std::vector<int> out;
  for (int l = 0; l < num_layers; ++l)
    if (IsMoeLayer(l)) out.push_back(l);
  return out;
}

absl::StatusOr<ModelConfig> ParseModelConfig(const std::string& text, const std::string& source) {
  json j;
  try {
    j = json::parse(text);
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": not valid JSON: ", e.what()));
  }
  if (!j.is_object()) return absl::InvalidArgumentError(absl::StrCat(source, ": not a JSON object"));
  ModelConfig c;
  std::string arch_name;
  if (j.contains("architectures") && j["architectures"].is_array() && !j["architectures"].empty() &&
      j["architectures"][0].is_string()) {
    arch_name = j["architectures"][0].get<std::string>();
  } else if (j.contains("model_type") && j["model_type"].is_string()) {
    arch_name = j["model_type"].get<std::string>();
  }
  if (arch_name == "MixtralForCausalLM" || arch_name == "mixtral") {
    c.arch = Arch::kMixtral;
  } else if (arch_name == "DeepseekV3ForCausalLM" || arch_name == "deepseek_v3") {
    c.arch = Arch::kDeepseekV3;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": unsupported architecture '", arch_name,
                     "' (supported: MixtralForCausalLM, DeepseekV3ForCausalLM)"));
  }
  RETURN_IF_ERROR(Get(j, "vocab_size", &c.vocab_size, source, true));
  RETURN_IF_ERROR(Get(j, "hidden_size", &c.hidden_size, source, true));
  RETURN_IF_ERROR(Get(j, "intermediate_size", &c.intermediate_size, source, true));
  RETURN_IF_ERROR(Get(j, "num_hidden_layers", &c.num_layers, source, true));
  RETURN_IF_ERROR(Get(j, "num_attention_heads", &c.num_heads, source, true));
  c.num_kv_heads = c.num_heads;
  RETURN_IF_ERROR(Get(j, "num_key_value_heads", &c.num_kv_heads, source));
  RETURN_IF_ERROR(Get(j, "rms_norm_eps", &c.rms_norm_eps, source));
  RETURN_IF_ERROR(Get(j, "rope_theta", &c.rope_theta, source));
  RETURN_IF_ERROR(Get(j, "max_position_embeddings", &c.max_position_embeddings, source));
  RETURN_IF_ERROR(Get(j, "tie_word_embeddings", &c.tie_word_embeddings, source));
  RETURN_IF_ERROR(Get(j, "num_experts_per_tok", &c.top_k, source));
  for (auto [v, k] : {std::pair{c.vocab_size, "vocab_size"}, {c.hidden_size, "hidden_size"},
                      {c.intermediate_size, "intermediate_size"}, {c.num_layers, "num_hidden_layers"},
                      {c.num_heads, "num_attention_heads"}, {c.num_kv_heads, "num_key_value_heads"},
                      {c.top_k, "num_experts_per_tok"}}) {
    RETURN_IF_ERROR(Positive(v, k, source));
  }

  if (c.arch == Arch::kMixtral) {
    RETURN_IF_ERROR(Get(j, "num_local_experts", &c.num_experts, source, true));
    RETURN_IF_ERROR(Positive(c.num_experts, "num_local_experts", source));
    c.moe_intermediate_size = c.intermediate_size;
    c.head_dim = c.hidden_size / c.num_heads;
    RETURN_IF_ERROR(Get(j, "head_dim", &c.head_dim, source));
    if (c.hidden_size % c.num_heads != 0 && !j.contains("head_dim")) {
      return absl::InvalidArgumentError(absl::StrCat(source, ": hidden_size ", c.hidden_size,
                                                     " is not divisible by num_attention_heads ", c.num_heads));
    }
    if (c.num_heads % c.num_kv_heads != 0) {
      return absl::InvalidArgumentError(absl::StrCat(source, ": num_attention_heads ", c.num_heads,
                                                     " is not a multiple of num_key_value_heads ", c.num_kv_heads));
    }
    c.scoring = ScoringFunc::kSoftmax;
    c.norm_topk_prob = true;
  } else {
    return absl::UnimplementedError(absl::StrCat(source, ": DeepseekV3ForCausalLM is not supported yet"));
  }
  if (c.top_k > c.num_experts) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": num_experts_per_tok ", c.top_k,
                                                   " exceeds the number of experts ", c.num_experts));
  }
  if (c.head_dim % 2 != 0) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": head_dim must be even for rotary embeddings"));
  }
  return c;
}

absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& model_dir) {
  const std::string path = model_dir + "/config.json";
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return ParseModelConfig(text, path);
}

std::string ModelConfigToJson(const ModelConfig& c) {
  json j;
  if (c.arch == Arch::kMixtral) {
    j = {{"architectures", {"MixtralForCausalLM"}},
         {"model_type", "mixtral"},
         {"vocab_size", c.vocab_size},
         {"hidden_size", c.hidden_size},
         {"intermediate_size", c.intermediate_size},
         {"num_hidden_layers", c.num_layers},
         {"num_attention_heads", c.num_heads},
         {"num_key_value_heads", c.num_kv_heads},
         {"num_local_experts", c.num_experts},
         {"num_experts_per_tok", c.top_k},
         {"rms_norm_eps", c.rms_norm_eps},
         {"rope_theta", c.rope_theta},
         {"max_position_embeddings", c.max_position_embeddings},
         {"tie_word_embeddings", c.tie_word_embeddings},
         {"hidden_act", "silu"},
         {"torch_dtype", "float32"},
         {"bos_token_id", 1},
         {"eos_token_id", 2}};
  }
  return j.dump(2);
}

std::string LayerPrefix(int layer) { return absl::StrCat("model.layers.", layer, "."); }

ExpertTensorNames RoutedExpertNames(const ModelConfig& cfg, int layer, int expert) {
  const std::string p = LayerPrefix(layer);
  if (cfg.arch == Arch::kMixtral) {
    const std::string e = absl::StrCat(p, "block_sparse_moe.experts.", expert, ".");
    return {e + "w1.weight", e + "w3.weight", e + "w2.weight"};
  }
  const std::string e = absl::StrCat(p, "mlp.experts.", expert, ".");
  return {e + "gate_proj.weight", e + "up_proj.weight", e + "down_proj.weight"};
}

ExpertTensorNames SharedExpertNames(const ModelConfig& cfg, int layer) {
  const std::string e = LayerPrefix(layer) + "mlp.shared_experts.";
  return {e + "gate_proj.weight", e + "up_proj.weight", e + "down_proj.weight"};
}

ExpertTensorNames DenseMlpNames(const ModelConfig& cfg, int layer) {
  const std::string e = LayerPrefix(layer) + "mlp.";
  return {e + "gate_proj.weight", e + "up_proj.weight", e + "down_proj.weight"};
}

std::string GateWeightName(const ModelConfig& cfg, int layer) {
  return LayerPrefix(layer) +
         (cfg.arch == Arch::kMixtral ? "block_sparse_moe.gate.weight" : "mlp.gate.weight");
}

std::string GateBiasName(const ModelConfig& cfg, int layer) {
  return LayerPrefix(layer) + "mlp.gate.e_score_correction_bias";
}

}  // namespace moemesh
