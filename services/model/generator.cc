#include "services/model/generator.h"

#include <sys/stat.h>

#include <cmath>
#include <fstream>
#include <vector>

#include "absl/hash/hash.h"
#include "absl/strings/str_cat.h"
#include "services/common/status_macros.h"
#include "services/model/fp8.h"
#include "services/model/safetensors.h"
#include "services/text/tokenizer.h"

namespace moemesh {
namespace {

// splitmix64: a fast, well-mixed stream per tensor.
struct Rng {
  uint64_t s;
  uint64_t Next() {
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  // Uniform in [-1, 1).
  float Sym() { return static_cast<float>(static_cast<double>(Next() >> 11) * 0x1.0p-52 - 1.0); }
};

uint64_t TensorSeed(uint64_t seed, const std::string& name) {
  uint64_t h = 1469598103934665603ull;
  for (char c : name) h = (h ^ static_cast<uint8_t>(c)) * 1099511628211ull;
  return h ^ (seed * 0x9e3779b97f4a7c15ull);
}

class Builder {
 public:
  Builder(const GeneratorOptions& o) : o_(o) {
    if (o.dtype == DType::kF8E4M3) {
      fp8_ = true;
      plain_ = DType::kBF16;  // R1 keeps norms, embeddings, gate and lm_head in BF16
      block_rows_ = o.config.fp8_block_rows > 0 ? o.config.fp8_block_rows : kDefaultFp8BlockSize;
      block_cols_ = o.config.fp8_block_cols > 0 ? o.config.fp8_block_cols : kDefaultFp8BlockSize;
    } else {
      plain_ = o.dtype;
    }
  }

  // Uniform values with standard deviation `std` (uniform on [-a, a] has std a/sqrt(3)).
  void Random(const std::string& name, std::vector<int64_t> shape, float std) {
    w_.Add(name, plain_, shape, Values(name, shape, std));
  }
  // A 2-D projection weight [out, in]: FP8 with block scales when quantising.
  void Proj(const std::string& name, std::vector<int64_t> shape, float std) {
    std::vector<float> v = Values(name, shape, std);
    if (!fp8_) {
      w_.Add(name, plain_, std::move(shape), v);
      return;
    }
    Fp8Blocks q = QuantizeFp8Blocks(v, shape[0], shape[1], block_rows_, block_cols_);
    w_.AddRaw(name, DType::kF8E4M3, std::move(shape), std::move(q.data));
    w_.Add(Fp8ScaleName(name), DType::kF32, q.scale_shape, q.scale_inv);
  }
  // 1 + noise, for norm weights.
  void Norm(const std::string& name, int64_t n) {
    std::vector<float> v(n);
    Rng rng{TensorSeed(o_.seed, name)};
    for (float& x : v) x = 1.0f + 0.1f * rng.Sym();
    w_.Add(name, plain_, {n}, v);
  }
  // F32 whatever the dtype (e_score_correction_bias is F32 in R1 too).
  void F32(const std::string& name, std::vector<int64_t> shape, float std) {
    w_.Add(name, DType::kF32, shape, Values(name, shape, std));
  }
  SafetensorsWriter& writer() { return w_; }

 private:
  std::vector<float> Values(const std::string& name, const std::vector<int64_t>& shape, float std) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    std::vector<float> v(n);
    Rng rng{TensorSeed(o_.seed, name)};
    const float a = std * std::sqrt(3.0f);
    for (float& x : v) x = a * rng.Sym();
    return v;
  }

  const GeneratorOptions& o_;
  bool fp8_ = false;
  DType plain_ = DType::kF32;
  int block_rows_ = kDefaultFp8BlockSize, block_cols_ = kDefaultFp8BlockSize;
  SafetensorsWriter w_;
};

float InvSqrt(int64_t n) { return 1.0f / std::sqrt(static_cast<float>(n)); }

// The routed/shared experts and the router of MoE layer `l`, or the dense FFN of a dense one.
void AddFfn(Builder& b, const ModelConfig& c, int l) {
  const int64_t h = c.hidden_size;
  if (!c.IsMoeLayer(l)) {
    const ExpertTensorNames n = DenseMlpNames(c, l);
    const int64_t inter = c.intermediate_size;
    b.Proj(n.gate, {inter, h}, InvSqrt(h));
    b.Proj(n.up, {inter, h}, InvSqrt(h));
    b.Proj(n.down, {h, inter}, InvSqrt(inter));
    return;
  }
  // Gate logits with a standard deviation of about 3: clear winners among experts.
  b.Random(GateWeightName(c, l), {c.num_experts, h}, 3.0f * InvSqrt(h));
  if (c.arch == Arch::kDeepseekV3 && c.topk_method == TopkMethod::kNoauxTc) {
    // Large enough to change some selections among sigmoid scores in (0, 1).
    b.F32(GateBiasName(c, l), {c.num_experts}, 0.2f);
  }
  // Mixtral configs built by hand may leave moe_intermediate_size unset; their experts are
  // intermediate_size wide.
  const int64_t inter = c.arch == Arch::kMixtral ? c.intermediate_size : c.moe_intermediate_size;
  for (int e = 0; e < c.num_experts; ++e) {
    const ExpertTensorNames n = RoutedExpertNames(c, l, e);
    b.Proj(n.gate, {inter, h}, InvSqrt(h));
    b.Proj(n.up, {inter, h}, InvSqrt(h));
    b.Proj(n.down, {h, inter}, InvSqrt(inter));
  }
  if (c.n_shared_experts > 0) {
    const ExpertTensorNames n = SharedExpertNames(c, l);
    const int64_t si = inter * c.n_shared_experts;
    b.Proj(n.gate, {si, h}, InvSqrt(h));
    b.Proj(n.up, {si, h}, InvSqrt(h));
    b.Proj(n.down, {h, si}, InvSqrt(si));
  }
}

void AddMlaAttention(Builder& b, const ModelConfig& c, int l) {
  const int64_t h = c.hidden_size, nh = c.num_heads, kvl = c.kv_lora_rank;
  const int64_t nope = c.qk_nope_head_dim, rope = c.qk_rope_head_dim, vd = c.v_head_dim;
  const std::string p = LayerPrefix(l) + "self_attn.";
  if (c.q_lora_rank > 0) {
    const int64_t ql = c.q_lora_rank;
    b.Proj(p + "q_a_proj.weight", {ql, h}, InvSqrt(h));
    b.Norm(p + "q_a_layernorm.weight", ql);
    b.Proj(p + "q_b_proj.weight", {nh * (nope + rope), ql}, InvSqrt(ql));
  } else {
    b.Proj(p + "q_proj.weight", {nh * (nope + rope), h}, InvSqrt(h));
  }
  b.Proj(p + "kv_a_proj_with_mqa.weight", {kvl + rope, h}, InvSqrt(h));
  b.Norm(p + "kv_a_layernorm.weight", kvl);
  b.Proj(p + "kv_b_proj.weight", {nh * (nope + vd), kvl}, InvSqrt(kvl));
  b.Proj(p + "o_proj.weight", {h, nh * vd}, 0.5f * InvSqrt(nh * vd));
}

absl::Status CheckDeepseek(const ModelConfig& c) {
  if (c.vocab_size <= 0 || c.hidden_size <= 0 || c.num_layers <= 0 || c.num_heads <= 0 ||
      c.num_experts <= 0 || c.intermediate_size <= 0 || c.moe_intermediate_size <= 0 ||
      c.kv_lora_rank <= 0 || c.qk_rope_head_dim <= 0 || c.v_head_dim <= 0 ||
      c.qk_nope_head_dim < 0 || c.q_lora_rank < 0 || c.n_shared_experts < 0) {
    return absl::InvalidArgumentError("model sizes must be positive");
  }
  return absl::OkStatus();
}

}  // namespace

ModelConfig SmallMixtralConfig(int vocab, int hidden, int inter, int layers, int heads,
                               int kv_heads, int experts, int top_k) {
  ModelConfig c;
  c.arch = Arch::kMixtral;
  c.vocab_size = vocab;
  c.hidden_size = hidden;
  c.intermediate_size = inter;
  c.moe_intermediate_size = inter;
  c.num_layers = layers;
  c.num_heads = heads;
  c.num_kv_heads = kv_heads;
  c.head_dim = hidden / heads;
  c.num_experts = experts;
  c.top_k = top_k;
  c.rms_norm_eps = 1e-5f;
  c.rope_theta = 10000.0f;
  c.max_position_embeddings = 4096;
  return c;
}

ModelConfig SmallDeepseekConfig(int vocab, int hidden, int layers) {
  ModelConfig c;
  c.arch = Arch::kDeepseekV3;
  c.vocab_size = vocab;
  c.hidden_size = hidden;
  c.intermediate_size = 2 * hidden;
  c.moe_intermediate_size = hidden / 2;
  c.num_layers = layers;
  c.num_heads = 4;
  c.num_kv_heads = 4;
  c.num_experts = 8;
  c.top_k = 2;
  c.n_shared_experts = 1;
  c.first_k_dense_replace = 1;
  c.moe_layer_freq = 1;
  c.n_group = 4;
  c.topk_group = 2;
  c.topk_method = TopkMethod::kNoauxTc;
  c.scoring = ScoringFunc::kSigmoid;
  c.norm_topk_prob = true;
  c.routed_scaling_factor = 2.5f;
  c.q_lora_rank = hidden / 2;
  c.kv_lora_rank = hidden / 2;
  c.qk_nope_head_dim = 16;
  c.qk_rope_head_dim = 8;
  c.v_head_dim = 16;
  c.head_dim = c.qk_nope_head_dim + c.qk_rope_head_dim;
  c.rms_norm_eps = 1e-6f;
  c.rope_theta = 10000.0f;
  c.max_position_embeddings = 4096;
  return c;
}

absl::Status GenerateModel(const GeneratorOptions& o_in, const std::string& dir) {
  GeneratorOptions o = o_in;
  ModelConfig& c = o.config;
  if (o.dtype == DType::kF8E4M3 && c.fp8_block_rows <= 0) {
    c.fp8_block_rows = kDefaultFp8BlockSize;
    c.fp8_block_cols = kDefaultFp8BlockSize;
  }
  if (o.dtype != DType::kF8E4M3) c.fp8_block_rows = c.fp8_block_cols = 0;
  if (c.arch == Arch::kDeepseekV3) {
    RETURN_IF_ERROR(CheckDeepseek(c));
  } else {
    if (c.vocab_size <= 0 || c.hidden_size <= 0 || c.num_layers <= 0 || c.num_heads <= 0 ||
        c.num_kv_heads <= 0 || c.num_experts <= 0 || c.intermediate_size <= 0) {
      return absl::InvalidArgumentError("model sizes must be positive");
    }
    if (c.hidden_size % c.num_heads != 0 || c.num_heads % c.num_kv_heads != 0 ||
        (c.hidden_size / c.num_heads) % 2 != 0) {
      return absl::InvalidArgumentError(
          "hidden must be a multiple of heads, heads a multiple of kv-heads, and head_dim even");
    }
    if (c.top_k < 1 || c.top_k > c.num_experts) {
      return absl::InvalidArgumentError("top-k must be between 1 and the number of experts");
    }
  }
  // Validate the config by round-tripping it through the parser.
  const std::string config_json = ModelConfigToJson(c);
  RETURN_IF_ERROR(ParseModelConfig(config_json, "generated config").status());

  ::mkdir(dir.c_str(), 0755);
  struct stat st;
  if (::stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    return absl::InvalidArgumentError(absl::StrCat("cannot create directory ", dir));
  }
  const int64_t h = c.hidden_size, v = c.vocab_size;
  const float inv_h = InvSqrt(h);
  Builder b(o);
  b.Random("model.embed_tokens.weight", {v, h}, 1.0f);
  for (int l = 0; l < c.num_layers; ++l) {
    const std::string p = LayerPrefix(l);
    b.Norm(p + "input_layernorm.weight", h);
    if (c.arch == Arch::kDeepseekV3) {
      AddMlaAttention(b, c, l);
    } else {
      const int64_t hd = h / c.num_heads;
      const int64_t qd = c.num_heads * hd, kvd = c.num_kv_heads * hd;
      b.Proj(p + "self_attn.q_proj.weight", {qd, h}, inv_h);
      b.Proj(p + "self_attn.k_proj.weight", {kvd, h}, inv_h);
      b.Proj(p + "self_attn.v_proj.weight", {kvd, h}, inv_h);
      b.Proj(p + "self_attn.o_proj.weight", {h, qd}, 0.5f / std::sqrt(static_cast<float>(qd)));
    }
    b.Norm(p + "post_attention_layernorm.weight", h);
    AddFfn(b, c, l);
  }
  // DeepSeek's multi-token-prediction layers follow the last layer; a few of their tensors are
  // enough to show that loaders skip them.
  for (int l = c.num_layers; l < c.num_layers + c.num_nextn_predict_layers; ++l) {
    const std::string p = LayerPrefix(l);
    b.Norm(p + "enorm.weight", h);
    b.Norm(p + "hnorm.weight", h);
    b.Proj(p + "eh_proj.weight", {h, 2 * h}, InvSqrt(2 * h));
    b.Norm(p + "shared_head.norm.weight", h);
  }
  b.Norm("model.norm.weight", h);
  // Logits with a standard deviation of about 4: distinct tokens, clearly different logits.
  b.Random("lm_head.weight", {v, h}, 4.0f * inv_h);

  if (o.shard_bytes > 0) {
    RETURN_IF_ERROR(b.writer().WriteSharded(dir, o.shard_bytes));
  } else {
    RETURN_IF_ERROR(b.writer().Write(dir + "/model.safetensors"));
  }
  std::ofstream cfg_out(dir + "/config.json");
  cfg_out << config_json << "\n";
  std::ofstream tok_out(dir + "/tokenizer.json");
  tok_out << Tokenizer::ByteLevelJson(c.vocab_size) << "\n";
  if (!cfg_out || !tok_out) return absl::InternalError(absl::StrCat("cannot write files in ", dir));
  return absl::OkStatus();
}

}  // namespace moemesh
