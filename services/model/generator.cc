#include "services/model/generator.h"

#include <sys/stat.h>

#include <cmath>
#include <fstream>
#include <vector>

#include "absl/hash/hash.h"
#include "absl/strings/str_cat.h"
#include "services/common/status_macros.h"
#include "services/model/safetensors.h"
#include "services/model/tokenizer.h"

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
  Builder(const GeneratorOptions& o) : o_(o) {}

  // Uniform values with standard deviation `std` (uniform on [-a, a] has std a/sqrt(3)).
  void Random(const std::string& name, std::vector<int64_t> shape, float std) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    std::vector<float> v(n);
    Rng rng{TensorSeed(o_.seed, name)};
    const float a = std * std::sqrt(3.0f);
    for (float& x : v) x = a * rng.Sym();
    w_.Add(name, o_.dtype, std::move(shape), v);
  }
  // 1 + noise, for norm weights.
  void Norm(const std::string& name, int64_t n) {
    std::vector<float> v(n);
    Rng rng{TensorSeed(o_.seed, name)};
    for (float& x : v) x = 1.0f + 0.1f * rng.Sym();
    w_.Add(name, o_.dtype, {n}, v);
  }
  SafetensorsWriter& writer() { return w_; }

 private:
  const GeneratorOptions& o_;
  SafetensorsWriter w_;
};

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

absl::Status GenerateModel(const GeneratorOptions& o, const std::string& dir) {
  const ModelConfig& c = o.config;
  if (c.arch != Arch::kMixtral) return absl::UnimplementedError("only --arch mixtral is supported");
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
  // Validate the config by round-tripping it through the parser.
  const std::string config_json = ModelConfigToJson(c);
  RETURN_IF_ERROR(ParseModelConfig(config_json, "generated config").status());

  ::mkdir(dir.c_str(), 0755);
  struct stat st;
  if (::stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    return absl::InvalidArgumentError(absl::StrCat("cannot create directory ", dir));
  }
  const int64_t h = c.hidden_size, v = c.vocab_size, inter = c.intermediate_size;
  const int64_t hd = h / c.num_heads;
  const int64_t qd = c.num_heads * hd, kvd = c.num_kv_heads * hd;
  const float inv_h = 1.0f / std::sqrt(static_cast<float>(h));
  Builder b(o);
  b.Random("model.embed_tokens.weight", {v, h}, 1.0f);
  for (int l = 0; l < c.num_layers; ++l) {
    const std::string p = LayerPrefix(l);
    b.Norm(p + "input_layernorm.weight", h);
    b.Random(p + "self_attn.q_proj.weight", {qd, h}, inv_h);
    b.Random(p + "self_attn.k_proj.weight", {kvd, h}, inv_h);
    b.Random(p + "self_attn.v_proj.weight", {kvd, h}, inv_h);
    b.Random(p + "self_attn.o_proj.weight", {h, qd}, 0.5f / std::sqrt(static_cast<float>(qd)));
    b.Norm(p + "post_attention_layernorm.weight", h);
    // Gate logits with a standard deviation of about 3: clear winners among experts.
    b.Random(GateWeightName(c, l), {c.num_experts, h}, 3.0f * inv_h);
    for (int e = 0; e < c.num_experts; ++e) {
      const ExpertTensorNames n = RoutedExpertNames(c, l, e);
      b.Random(n.gate, {inter, h}, inv_h);
      b.Random(n.up, {inter, h}, inv_h);
      b.Random(n.down, {h, inter}, 1.0f / std::sqrt(static_cast<float>(inter)));
    }
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
