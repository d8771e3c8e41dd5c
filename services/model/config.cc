#include "services/model/config.h"

#include <charconv>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <type_traits>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
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
  const json& v = j[key];
  // nlohmann converts numbers with a plain cast, which is undefined behaviour out of range
  // (a config with "kv_lora_rank": 8e42 must be an error, not a garbage size).
  if constexpr (std::is_integral_v<T> && !std::is_same_v<T, bool>) {
    if (v.is_number()) {
      using L = std::numeric_limits<T>;
      bool ok;
      if (v.is_number_float()) {
        const double d = v.get<double>();
        ok = std::isfinite(d) && d == std::floor(d) && d >= static_cast<double>(L::min()) &&
             d <= static_cast<double>(L::max());
      } else if (v.is_number_unsigned()) {
        ok = v.get<uint64_t>() <= static_cast<uint64_t>(L::max());
      } else {
        const int64_t i = v.get<int64_t>();
        ok = i >= static_cast<int64_t>(L::min()) &&
             (i < 0 || static_cast<uint64_t>(i) <= static_cast<uint64_t>(L::max()));
      }
      if (!ok) {
        return absl::InvalidArgumentError(absl::StrCat(source, ": field '", key, "': ", v.dump(),
                                                       " is not an integer in [", L::min(), ", ",
                                                       L::max(), "]"));
      }
    }
  } else if constexpr (std::is_floating_point_v<T>) {
    if (v.is_number_float()) {
      const double d = v.get<double>();
      if (std::isfinite(d) && std::fabs(d) > static_cast<double>(std::numeric_limits<T>::max())) {
        return absl::InvalidArgumentError(
            absl::StrCat(source, ": field '", key, "': ", v.dump(), " is out of range"));
      }
    }
  }
  try {
    *out = v.get<T>();
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": field '", key, "': ", e.what()));
  }
  return absl::OkStatus();
}

absl::Status Positive(int v, const char* key, const std::string& source) {
  if (v <= 0)
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": '", key, "' must be positive, got ", v));
  return absl::OkStatus();
}

absl::Status Invalid(const std::string& source, absl::string_view key, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(source, ": '", key, "' ", what));
}

// rope_scaling: null, or {"type" (or "rope_type"): "yarn", factor,
// original_max_position_embeddings, beta_fast, beta_slow, mscale, mscale_all_dim}. Defaults are
// those of HF's DeepseekV3 code.
absl::Status ParseRopeScaling(const json& j, const std::string& source, ModelConfig* c) {
  if (!j.contains("rope_scaling") || j["rope_scaling"].is_null()) return absl::OkStatus();
  const json& r = j["rope_scaling"];
  if (!r.is_object()) return Invalid(source, "rope_scaling", "must be null or an object");
  std::string type;
  const std::string src = source + ": rope_scaling";
  RETURN_IF_ERROR(Get(r, "type", &type, src));
  RETURN_IF_ERROR(Get(r, "rope_type", &type, src));
  if (type != "yarn") {
    return Invalid(source, "rope_scaling.type",
                   absl::StrCat("'", type, "' is not supported (supported: yarn, or null)"));
  }
  c->rope_factor = 1.0f;
  RETURN_IF_ERROR(Get(r, "factor", &c->rope_factor, src, true));
  c->rope_original_max_position = c->max_position_embeddings;
  RETURN_IF_ERROR(
      Get(r, "original_max_position_embeddings", &c->rope_original_max_position, src, true));
  RETURN_IF_ERROR(Get(r, "beta_fast", &c->rope_beta_fast, src));
  RETURN_IF_ERROR(Get(r, "beta_slow", &c->rope_beta_slow, src));
  RETURN_IF_ERROR(Get(r, "mscale", &c->rope_mscale, src));
  RETURN_IF_ERROR(Get(r, "mscale_all_dim", &c->rope_mscale_all_dim, src));
  if (!(c->rope_factor >= 1.0f) || !std::isfinite(c->rope_factor)) {
    return Invalid(source, "rope_scaling.factor",
                   absl::StrCat("must be >= 1, got ", c->rope_factor));
  }
  if (c->rope_original_max_position <= 0) {
    return Invalid(source, "rope_scaling.original_max_position_embeddings", "must be positive");
  }
  if (!(c->rope_beta_fast > 0.0f) || !(c->rope_beta_slow > 0.0f)) {
    return Invalid(source, "rope_scaling.beta_fast/beta_slow", "must be positive");
  }
  if (!std::isfinite(c->rope_mscale) || !std::isfinite(c->rope_mscale_all_dim)) {
    return Invalid(source, "rope_scaling.mscale", "must be finite");
  }
  return absl::OkStatus();
}

// quantization_config: absent/null, or {quant_method: fp8, weight_block_size: [rows, cols]}
// as in the published DeepSeek-V3/R1 checkpoints.
absl::Status ParseQuantization(const json& j, const std::string& source, ModelConfig* c) {
  if (!j.contains("quantization_config") || j["quantization_config"].is_null())
    return absl::OkStatus();
  const json& q = j["quantization_config"];
  if (!q.is_object()) return Invalid(source, "quantization_config", "must be an object");
  const std::string src = source + ": quantization_config";
  std::string method;
  RETURN_IF_ERROR(Get(q, "quant_method", &method, src, true));
  if (method != "fp8") {
    return Invalid(source, "quantization_config.quant_method",
                   absl::StrCat("'", method, "' is not supported (supported: fp8)"));
  }
  std::string fmt = "e4m3";
  RETURN_IF_ERROR(Get(q, "fmt", &fmt, src));
  if (fmt != "e4m3") {
    return Invalid(source, "quantization_config.fmt",
                   absl::StrCat("'", fmt, "' is not supported (supported: e4m3)"));
  }
  std::vector<int> block = {128, 128};
  RETURN_IF_ERROR(Get(q, "weight_block_size", &block, src));
  if (block.size() != 2 || block[0] <= 0 || block[1] <= 0) {
    return Invalid(source, "quantization_config.weight_block_size",
                   "must be two positive integers");
  }
  c->fp8_block_rows = block[0];
  c->fp8_block_cols = block[1];
  return absl::OkStatus();
}

absl::Status ParseDeepseekV3(const json& j, const std::string& source, ModelConfig* c) {
  RETURN_IF_ERROR(Get(j, "n_routed_experts", &c->num_experts, source, true));
  RETURN_IF_ERROR(Positive(c->num_experts, "n_routed_experts", source));
  c->moe_intermediate_size = c->intermediate_size;
  RETURN_IF_ERROR(Get(j, "moe_intermediate_size", &c->moe_intermediate_size, source, true));
  RETURN_IF_ERROR(Positive(c->moe_intermediate_size, "moe_intermediate_size", source));
  RETURN_IF_ERROR(Get(j, "n_shared_experts", &c->n_shared_experts, source));
  if (c->n_shared_experts < 0) return Invalid(source, "n_shared_experts", "must not be negative");
  RETURN_IF_ERROR(Get(j, "first_k_dense_replace", &c->first_k_dense_replace, source));
  if (c->first_k_dense_replace < 0 || c->first_k_dense_replace > c->num_layers) {
    return Invalid(source, "first_k_dense_replace",
                   absl::StrCat("must be in [0, num_hidden_layers=", c->num_layers, "], got ",
                                c->first_k_dense_replace));
  }
  RETURN_IF_ERROR(Get(j, "moe_layer_freq", &c->moe_layer_freq, source));
  RETURN_IF_ERROR(Positive(c->moe_layer_freq, "moe_layer_freq", source));
  RETURN_IF_ERROR(Get(j, "num_nextn_predict_layers", &c->num_nextn_predict_layers, source));
  if (c->num_nextn_predict_layers < 0)
    return Invalid(source, "num_nextn_predict_layers", "must not be negative");

  // Routing.
  c->n_group = 1;
  c->topk_group = 1;
  RETURN_IF_ERROR(Get(j, "n_group", &c->n_group, source));
  RETURN_IF_ERROR(Get(j, "topk_group", &c->topk_group, source));
  RETURN_IF_ERROR(Positive(c->n_group, "n_group", source));
  RETURN_IF_ERROR(Positive(c->topk_group, "topk_group", source));
  std::string method = "greedy";
  RETURN_IF_ERROR(Get(j, "topk_method", &method, source));
  if (method == "noaux_tc") {
    c->topk_method = TopkMethod::kNoauxTc;
  } else if (method == "greedy") {
    c->topk_method = TopkMethod::kGreedy;
  } else {
    return Invalid(source, "topk_method",
                   absl::StrCat("'", method, "' is not supported (supported: noaux_tc, greedy)"));
  }
  std::string scoring = "softmax";
  RETURN_IF_ERROR(Get(j, "scoring_func", &scoring, source));
  if (scoring == "sigmoid") {
    c->scoring = ScoringFunc::kSigmoid;
  } else if (scoring == "softmax") {
    c->scoring = ScoringFunc::kSoftmax;
  } else {
    return Invalid(source, "scoring_func",
                   absl::StrCat("'", scoring, "' is not supported (supported: sigmoid, softmax)"));
  }
  c->norm_topk_prob = false;  // HF DeepseekV3Config's default
  RETURN_IF_ERROR(Get(j, "norm_topk_prob", &c->norm_topk_prob, source));
  c->routed_scaling_factor = 1.0f;
  RETURN_IF_ERROR(Get(j, "routed_scaling_factor", &c->routed_scaling_factor, source));
  if (!(c->routed_scaling_factor > 0.0f) || !std::isfinite(c->routed_scaling_factor)) {
    return Invalid(source, "routed_scaling_factor",
                   absl::StrCat("must be positive and finite, got ", c->routed_scaling_factor));
  }

  // MLA attention.
  c->q_lora_rank = 0;
  RETURN_IF_ERROR(Get(j, "q_lora_rank", &c->q_lora_rank, source));  // null: plain q_proj
  if (c->q_lora_rank < 0) return Invalid(source, "q_lora_rank", "must be null or non-negative");
  RETURN_IF_ERROR(Get(j, "kv_lora_rank", &c->kv_lora_rank, source, true));
  RETURN_IF_ERROR(Get(j, "qk_nope_head_dim", &c->qk_nope_head_dim, source, true));
  RETURN_IF_ERROR(Get(j, "qk_rope_head_dim", &c->qk_rope_head_dim, source, true));
  RETURN_IF_ERROR(Get(j, "v_head_dim", &c->v_head_dim, source, true));
  RETURN_IF_ERROR(Positive(c->kv_lora_rank, "kv_lora_rank", source));
  RETURN_IF_ERROR(Positive(c->qk_rope_head_dim, "qk_rope_head_dim", source));
  RETURN_IF_ERROR(Positive(c->v_head_dim, "v_head_dim", source));
  if (c->qk_nope_head_dim < 0) return Invalid(source, "qk_nope_head_dim", "must not be negative");
  if (c->qk_rope_head_dim % 2 != 0) {
    return Invalid(source, "qk_rope_head_dim",
                   absl::StrCat("must be even for rotary embeddings, got ", c->qk_rope_head_dim));
  }
  // Every query head has its own latent projection; there are no shared K/V heads to group.
  c->num_kv_heads = c->num_heads;
  c->head_dim = c->qk_nope_head_dim + c->qk_rope_head_dim;
  bool attention_bias = false;
  RETURN_IF_ERROR(Get(j, "attention_bias", &attention_bias, source));
  if (attention_bias) return Invalid(source, "attention_bias", "true is not supported");
  std::string act = "silu";
  RETURN_IF_ERROR(Get(j, "hidden_act", &act, source));
  if (act != "silu")
    return Invalid(source, "hidden_act",
                   absl::StrCat("'", act, "' is not supported (supported: silu)"));
  return ParseRopeScaling(j, source, c);
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
  if (!j.is_object())
    return absl::InvalidArgumentError(absl::StrCat(source, ": not a JSON object"));
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
  for (auto [v, k] : {std::pair{c.vocab_size, "vocab_size"},
                      {c.hidden_size, "hidden_size"},
                      {c.intermediate_size, "intermediate_size"},
                      {c.num_layers, "num_hidden_layers"},
                      {c.num_heads, "num_attention_heads"},
                      {c.num_kv_heads, "num_key_value_heads"},
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
                                                     " is not divisible by num_attention_heads ",
                                                     c.num_heads));
    }
    if (c.num_heads % c.num_kv_heads != 0) {
      return absl::InvalidArgumentError(absl::StrCat(source, ": num_attention_heads ", c.num_heads,
                                                     " is not a multiple of num_key_value_heads ",
                                                     c.num_kv_heads));
    }
    c.scoring = ScoringFunc::kSoftmax;
    c.norm_topk_prob = true;
  } else {
    RETURN_IF_ERROR(ParseDeepseekV3(j, source, &c));
  }
  RETURN_IF_ERROR(ParseQuantization(j, source, &c));
  RETURN_IF_ERROR(ValidateRouting(c), source);
  if (c.head_dim % 2 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": head_dim must be even for rotary embeddings"));
  }
  return c;
}

absl::Status ValidateRouting(const ModelConfig& c) {
  if (c.num_experts <= 0) return absl::OkStatus();  // a dense model routes nothing
  if (c.top_k < 1 || c.top_k > c.num_experts) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_experts_per_tok ", c.top_k, " is not in [1, ", c.num_experts,
                     "]: it exceeds the number of experts or is not positive"));
  }
  if (c.n_group < 1 || c.num_experts % c.n_group != 0) {
    return absl::InvalidArgumentError(absl::StrCat("n_routed_experts ", c.num_experts,
                                                   " is not divisible by n_group ", c.n_group));
  }
  if (c.topk_group < 1 || c.topk_group > c.n_group) {
    return absl::InvalidArgumentError(
        absl::StrCat("topk_group ", c.topk_group, " must be in [1, n_group=", c.n_group, "]"));
  }
  // Only noaux_tc limits groups; then the top-k must fit in the experts of the kept groups,
  // or masked (-inf) experts would be chosen.
  if (c.topk_method == TopkMethod::kNoauxTc && c.n_group > 1) {
    const int kept = c.topk_group * (c.num_experts / c.n_group);
    if (c.top_k > kept) {
      return absl::InvalidArgumentError(absl::StrCat(
          "num_experts_per_tok ", c.top_k, " exceeds the ", kept,
          " experts of the topk_group=", c.topk_group, " groups that group-limited routing keeps"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& model_dir) {
  const std::string path = model_dir + "/config.json";
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return ParseModelConfig(text, path);
}

namespace {

// A float as the shortest decimal that reads back as the same float (1e-06, not
// 9.99999997e-07), so config.json shows the values that were meant.
double Num(float f) {
  char buf[32];
  auto r = std::to_chars(buf, buf + sizeof(buf), f);
  return std::strtod(std::string(buf, r.ptr).c_str(), nullptr);
}

}  // namespace

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
         {"rms_norm_eps", Num(c.rms_norm_eps)},
         {"rope_theta", Num(c.rope_theta)},
         {"max_position_embeddings", c.max_position_embeddings},
         {"tie_word_embeddings", c.tie_word_embeddings},
         {"hidden_act", "silu"},
         {"torch_dtype", "float32"},
         {"bos_token_id", 1},
         {"eos_token_id", 2}};
  } else {
    json rope_scaling = nullptr;
    if (c.HasYarn()) {
      rope_scaling = {{"type", "yarn"},
                      {"factor", Num(c.rope_factor)},
                      {"original_max_position_embeddings", c.rope_original_max_position},
                      {"beta_fast", Num(c.rope_beta_fast)},
                      {"beta_slow", Num(c.rope_beta_slow)},
                      {"mscale", Num(c.rope_mscale)},
                      {"mscale_all_dim", Num(c.rope_mscale_all_dim)}};
    }
    j = {{"architectures", {"DeepseekV3ForCausalLM"}},
         {"model_type", "deepseek_v3"},
         {"vocab_size", c.vocab_size},
         {"hidden_size", c.hidden_size},
         {"intermediate_size", c.intermediate_size},
         {"moe_intermediate_size", c.moe_intermediate_size},
         {"num_hidden_layers", c.num_layers},
         {"num_nextn_predict_layers", c.num_nextn_predict_layers},
         {"num_attention_heads", c.num_heads},
         {"num_key_value_heads", c.num_heads},
         {"n_shared_experts", c.n_shared_experts},
         {"n_routed_experts", c.num_experts},
         {"num_experts_per_tok", c.top_k},
         {"routed_scaling_factor", Num(c.routed_scaling_factor)},
         {"n_group", c.n_group},
         {"topk_group", c.topk_group},
         {"topk_method", c.topk_method == TopkMethod::kNoauxTc ? "noaux_tc" : "greedy"},
         {"scoring_func", c.scoring == ScoringFunc::kSigmoid ? "sigmoid" : "softmax"},
         {"norm_topk_prob", c.norm_topk_prob},
         {"first_k_dense_replace", c.first_k_dense_replace},
         {"moe_layer_freq", c.moe_layer_freq},
         {"q_lora_rank", c.q_lora_rank > 0 ? json(c.q_lora_rank) : json(nullptr)},
         {"kv_lora_rank", c.kv_lora_rank},
         {"qk_nope_head_dim", c.qk_nope_head_dim},
         {"qk_rope_head_dim", c.qk_rope_head_dim},
         {"v_head_dim", c.v_head_dim},
         {"rope_theta", Num(c.rope_theta)},
         {"rope_scaling", rope_scaling},
         {"rms_norm_eps", Num(c.rms_norm_eps)},
         {"max_position_embeddings", c.max_position_embeddings},
         {"tie_word_embeddings", c.tie_word_embeddings},
         {"attention_bias", false},
         {"hidden_act", "silu"},
         {"torch_dtype", c.fp8_block_rows > 0 ? "bfloat16" : "float32"},
         {"bos_token_id", 0},
         {"eos_token_id", 1}};
  }
  if (c.fp8_block_rows > 0) {
    j["quantization_config"] = {{"quant_method", "fp8"},
                                {"fmt", "e4m3"},
                                {"activation_scheme", "dynamic"},
                                {"weight_block_size", {c.fp8_block_rows, c.fp8_block_cols}}};
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
