#include "services/engine/engine.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <numbers>

#include "absl/strings/str_cat.h"
#include "services/common/status_macros.h"

namespace moemesh {

namespace {

// HF's yarn_get_mscale (DeepSeek's model.py inlines the same formula).
double YarnMscale(double scale, double mscale) {
  return scale <= 1.0 ? 1.0 : 0.1 * mscale * std::log(scale) + 1.0;
}

// DeepSeek-V3's rotary frequencies over the qk_rope_head_dim part, with YaRN's correction when
// rope_scaling is set (precompute_freqs_cis in DeepSeek's inference/model.py, which is HF's
// DeepseekV3YarnRotaryEmbedding too): dimensions that rotate fewer than beta_slow times over
// the original context are interpolated (frequency / factor), those rotating more than
// beta_fast times are kept, with a linear ramp between.
std::vector<float> MlaInvFreq(const ModelConfig& c) {
  const int64_t dim = c.qk_rope_head_dim;
  const double base = c.rope_theta;
  std::vector<double> freq(dim / 2);
  for (int64_t i = 0; i < dim / 2; ++i)
    freq[i] = 1.0 / std::pow(base, static_cast<double>(2 * i) / dim);
  if (c.HasYarn()) {
    const double orig = c.rope_original_max_position;
    auto correction_dim = [&](double rotations) {
      return dim * std::log(orig / (rotations * 2 * std::numbers::pi)) / (2 * std::log(base));
    };
    double low = std::floor(correction_dim(c.rope_beta_fast));
    double high = std::ceil(correction_dim(c.rope_beta_slow));
    low = std::max(low, 0.0);
    high = std::min(high, static_cast<double>(dim - 1));
    if (low == high) high += 0.001;
    for (int64_t i = 0; i < dim / 2; ++i) {
      const double ramp = std::clamp((static_cast<double>(i) - low) / (high - low), 0.0, 1.0);
      const double smooth = 1.0 - ramp;  // 1: keep the frequency, 0: interpolate it
      freq[i] = freq[i] / c.rope_factor * (1.0 - smooth) + freq[i] * smooth;
    }
  }
  return std::vector<float>(freq.begin(), freq.end());
}

// RMSNorm eps of q_a_layernorm and kv_a_layernorm: HF's DeepseekV3Attention builds them with
// the RMSNorm default (1e-6) rather than config.rms_norm_eps, and so does DeepSeek's model.py.
constexpr float kMlaLatentNormEps = 1e-6f;

}  // namespace

struct Engine::Layer {
  // Linear weights are Weight, in the checkpoint dtype (or Checkpoint::weights_dtype()); norms,
  // kv_b_proj (sliced per head) and its transpose are F32.
  Tensor input_norm;  // [hidden]
  Tensor post_norm;   // [hidden]
  // GQA attention (Mixtral).
  Weight wq;  // [heads * head_dim, hidden]; MLA without q_lora: [heads * qk_head, hidden]
  Weight wk;  // [kv_heads * head_dim, hidden]
  Weight wv;  // [kv_heads * head_dim, hidden]
  Weight wo;  // [hidden, heads * head_dim]; MLA: [hidden, heads * v_head_dim]
  // MLA attention (DeepSeek-V3); qk_head = qk_nope_head_dim + qk_rope_head_dim.
  Weight wq_a;       // [q_lora, hidden] (when q_lora_rank > 0)
  Tensor q_a_norm;   // [q_lora]
  Weight wq_b;       // [heads * qk_head, q_lora]
  Weight wkv_a;      // [kv_lora + qk_rope, hidden]
  Tensor kv_a_norm;  // [kv_lora]
  Tensor wkv_b;      // [heads * (qk_nope + v_head), kv_lora]
  // Per head, the k_nope rows of wkv_b transposed: [heads, kv_lora, qk_nope]. Absorbing them
  // into the query lets scores be taken against the cached latent directly.
  Tensor w_uk_t;
  // Dense FFN for layers that are not MoE layers.
  bool dense = false;
  Weight w1, w3, w2;
};

Engine::~Engine() = default;

int64_t Engine::weight_bytes() const {
  auto bytes = [](const Tensor& t) { return t.empty() ? 0 : t.numel() * 4; };
  int64_t b = embed_.bytes() + bytes(norm_);
  if (lm_head_.data != embed_.data) b += lm_head_.bytes();
  for (const auto& l : layers_) {
    for (const Weight* w :
         {&l->wq, &l->wk, &l->wv, &l->wo, &l->wq_a, &l->wq_b, &l->wkv_a, &l->w1, &l->w3, &l->w2}) {
      if (!w->empty()) b += w->bytes();
    }
    for (const Tensor* t :
         {&l->input_norm, &l->post_norm, &l->q_a_norm, &l->kv_a_norm, &l->wkv_b, &l->w_uk_t}) {
      b += bytes(*t);
    }
  }
  return b;
}

int64_t Engine::dense_bytes_per_step() const {
  // weight_bytes counts a tied table once, as the LM head's; an untied table is not read whole.
  return lm_head_.data == embed_.data ? weight_bytes() : weight_bytes() - embed_.bytes();
}

Sequence::~Sequence() { cache_->Release(blocks_); }

int64_t Sequence::capacity() const { return blocks() * cache_->block_tokens(); }

int64_t Sequence::cache_floats() const { return capacity() * cache_->layers() * cache_->row(); }

absl::Status Engine::LoadMla(const Checkpoint& ckpt, int l, Layer* layer) const {
  const ModelConfig& c = cfg_;
  const int64_t h = c.hidden_size, nh = c.num_heads;
  const int64_t nope = c.qk_nope_head_dim, rope = c.qk_rope_head_dim, vd = c.v_head_dim;
  const int64_t qk = nope + rope, kvl = c.kv_lora_rank;
  const std::string p = LayerPrefix(l) + "self_attn.";
  using Shape = std::vector<int64_t>;
  if (c.q_lora_rank > 0) {
    const int64_t ql = c.q_lora_rank;
    ASSIGN_OR_RETURN(layer->wq_a, ckpt.LoadWeight(p + "q_a_proj.weight", Shape{ql, h}));
    ASSIGN_OR_RETURN(layer->q_a_norm, ckpt.LoadF32(p + "q_a_layernorm.weight", Shape{ql}));
    ASSIGN_OR_RETURN(layer->wq_b, ckpt.LoadWeight(p + "q_b_proj.weight", Shape{nh * qk, ql}));
  } else {
    ASSIGN_OR_RETURN(layer->wq, ckpt.LoadWeight(p + "q_proj.weight", Shape{nh * qk, h}));
  }
  ASSIGN_OR_RETURN(layer->wkv_a,
                   ckpt.LoadWeight(p + "kv_a_proj_with_mqa.weight", Shape{kvl + rope, h}));
  ASSIGN_OR_RETURN(layer->kv_a_norm, ckpt.LoadF32(p + "kv_a_layernorm.weight", Shape{kvl}));
  ASSIGN_OR_RETURN(layer->wkv_b,
                   ckpt.LoadF32(p + "kv_b_proj.weight", Shape{nh * (nope + vd), kvl}));
  ASSIGN_OR_RETURN(layer->wo, ckpt.LoadWeight(p + "o_proj.weight", Shape{h, nh * vd}));
  layer->w_uk_t = Tensor::Zeros({nh, kvl, std::max<int64_t>(nope, 1)});
  for (int64_t hd = 0; hd < nh; ++hd) {
    const float* src = layer->wkv_b.data() + hd * (nope + vd) * kvl;  // [nope, kvl]
    float* dst = layer->w_uk_t.mutable_data() + hd * kvl * nope;      // [kvl, nope]
    for (int64_t i = 0; i < nope; ++i)
      for (int64_t j = 0; j < kvl; ++j) dst[j * nope + i] = src[i * kvl + j];
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Engine>> Engine::Load(const Checkpoint& ckpt, const ModelConfig& cfg,
                                                     ComputeBackend* backend, MoeLayer* moe) {
  std::unique_ptr<Engine> e(new Engine());
  e->cfg_ = cfg;
  e->backend_ = backend;
  e->moe_ = moe;
  const int64_t h = cfg.hidden_size, v = cfg.vocab_size;
  ASSIGN_OR_RETURN(e->embed_,
                   ckpt.LoadWeight("model.embed_tokens.weight", std::vector<int64_t>{v, h}));
  ASSIGN_OR_RETURN(e->norm_, ckpt.LoadF32("model.norm.weight", std::vector<int64_t>{h}));
  if (cfg.tie_word_embeddings && !ckpt.Has("lm_head.weight")) {
    e->lm_head_ = e->embed_;
  } else {
    ASSIGN_OR_RETURN(e->lm_head_, ckpt.LoadWeight("lm_head.weight", std::vector<int64_t>{v, h}));
  }
  const int64_t hd = cfg.head_dim, nh = cfg.num_heads, nkv = cfg.num_kv_heads;
  // Layers past num_layers (DeepSeek's multi-token-prediction layers) are never read.
  for (int l = 0; l < cfg.num_layers; ++l) {
    auto layer = std::make_unique<Layer>();
    const std::string p = LayerPrefix(l);
    ASSIGN_OR_RETURN(layer->input_norm,
                     ckpt.LoadF32(p + "input_layernorm.weight", std::vector<int64_t>{h}));
    ASSIGN_OR_RETURN(layer->post_norm,
                     ckpt.LoadF32(p + "post_attention_layernorm.weight", std::vector<int64_t>{h}));
    if (cfg.IsMla()) {
      RETURN_IF_ERROR(e->LoadMla(ckpt, l, layer.get()));
    } else {
      ASSIGN_OR_RETURN(layer->wq, ckpt.LoadWeight(p + "self_attn.q_proj.weight",
                                                  std::vector<int64_t>{nh * hd, h}));
      ASSIGN_OR_RETURN(layer->wk, ckpt.LoadWeight(p + "self_attn.k_proj.weight",
                                                  std::vector<int64_t>{nkv * hd, h}));
      ASSIGN_OR_RETURN(layer->wv, ckpt.LoadWeight(p + "self_attn.v_proj.weight",
                                                  std::vector<int64_t>{nkv * hd, h}));
      ASSIGN_OR_RETURN(layer->wo, ckpt.LoadWeight(p + "self_attn.o_proj.weight",
                                                  std::vector<int64_t>{h, nh * hd}));
    }
    if (!cfg.IsMoeLayer(l)) {
      layer->dense = true;
      const ExpertTensorNames n = DenseMlpNames(cfg, l);
      const int64_t inter = cfg.intermediate_size;
      ASSIGN_OR_RETURN(layer->w1, ckpt.LoadWeight(n.gate, std::vector<int64_t>{inter, h}));
      ASSIGN_OR_RETURN(layer->w3, ckpt.LoadWeight(n.up, std::vector<int64_t>{inter, h}));
      ASSIGN_OR_RETURN(layer->w2, ckpt.LoadWeight(n.down, std::vector<int64_t>{h, inter}));
    }
    e->layers_.push_back(std::move(layer));
  }
  if (cfg.IsMla()) {
    e->inv_freq_ = MlaInvFreq(cfg);
    double scale =
        1.0 / std::sqrt(static_cast<double>(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim));
    if (cfg.HasYarn()) {
      // Softmax scale × mscale², mscale = 0.1 · mscale_all_dim · ln(factor) + 1 (HF's
      // DeepseekV3Attention; DeepSeek's model.py uses its `mscale`, which R1's config sets equal
      // to mscale_all_dim). cos/sin are scaled by yarn_mscale(mscale) / yarn_mscale(mscale_all_dim)
      // as HF does, which is 1 whenever the two are equal, as in every published config.
      if (cfg.rope_mscale_all_dim != 0.0f) {
        const double m = YarnMscale(cfg.rope_factor, cfg.rope_mscale_all_dim);
        scale *= m * m;
      }
      e->rope_mscale_ = static_cast<float>(YarnMscale(cfg.rope_factor, cfg.rope_mscale) /
                                           YarnMscale(cfg.rope_factor, cfg.rope_mscale_all_dim));
    }
    e->attn_scale_ = static_cast<float>(scale);
    e->k_row_ = cfg.kv_lora_rank + cfg.qk_rope_head_dim;
    e->v_row_ = 0;
    RETURN_IF_ERROR(e->ConfigureKvCache(KvCacheOptions{}));
    return e;
  }
  // HF: inv_freq[i] = theta^(-2i / head_dim), computed in float32 as HF does.
  for (int64_t i = 0; i < hd / 2; ++i) {
    e->inv_freq_.push_back(
        1.0f / std::pow(cfg.rope_theta, static_cast<float>(2 * i) / static_cast<float>(hd)));
  }
  e->attn_scale_ = 1.0f / std::sqrt(static_cast<float>(hd));
  e->k_row_ = nkv * hd;
  e->v_row_ = nkv * hd;
  RETURN_IF_ERROR(e->ConfigureKvCache(KvCacheOptions{}));
  return e;
}

absl::Status Engine::ConfigureKvCache(const KvCacheOptions& options) {
  ASSIGN_OR_RETURN(std::unique_ptr<KvCache> kv,
                   KvCache::Create(options, cfg_.num_layers, k_row_ + v_row_));
  kv_ = std::move(kv);
  return absl::OkStatus();
}

std::unique_ptr<Sequence> Engine::NewSequence() const {
  return std::unique_ptr<Sequence>(new Sequence(kv_));
}

bool Engine::Reserve(Sequence* seq, int64_t tokens) const {
  const int64_t need = seq->cache_->BlocksFor(tokens) - seq->blocks();
  return need <= 0 || seq->cache_->Allocate(need, &seq->blocks_);
}

int64_t Engine::AttachCachedPrefix(Sequence* seq, absl::Span<const int32_t> tokens) const {
  KvCache& kv = *seq->cache_;
  if (seq->length_ != 0 || !seq->blocks_.empty() || tokens.size() < 2) return 0;
  const int64_t bt = kv.block_tokens();
  // The last token is always computed: its logits are what the caller wants next.
  const int64_t full = (static_cast<int64_t>(tokens.size()) - 1) / bt;
  uint64_t parent = 0;
  for (int64_t i = 0; i < full && kv.options().prefix_caching; ++i) {
    const auto block_tokens = tokens.subspan(i * bt, bt);
    const int32_t b = kv.Lookup(parent, block_tokens);
    if (b < 0) break;
    seq->blocks_.push_back(b);
    parent = KvCache::ChainHash(parent, block_tokens);
    seq->hashes_.push_back(parent);
  }
  const int64_t hit = seq->blocks() * bt;
  seq->length_ = hit;
  seq->prefix_hit_tokens_ = hit;
  seq->tokens_.assign(tokens.begin(), tokens.begin() + hit);
  return hit;
}

const float* Engine::StoreAndGather(int layer, const StepInput& in, int64_t start,
                                    const float* rows) {
  Sequence& s = *in.seq;
  KvCache& kv = *s.cache_;
  const int64_t bt = kv.block_tokens(), row = kv.row();
  const int64_t n = static_cast<int64_t>(in.tokens.size());
  for (int64_t p = start, done = 0; done < n;) {
    const int64_t slot = p % bt, take = std::min(bt - slot, n - done);
    kv.Write(s.blocks_[p / bt], layer, slot, rows + done * row, take);
    p += take;
    done += take;
  }
  const int64_t ctx = start + n;
  segments_.clear();
  // A BF16 block read in place is converted to F32 by each unit of attention work that reads
  // it (one per query position and key/value group), so with many new rows one conversion of
  // the whole context (the gather) costs less; either way the result is bitwise the same.
  constexpr int64_t kBf16InPlaceMaxNew = 8;
  const bool in_place = backend_->SupportsSegmentedCache() &&
                        (kv.options().dtype == DType::kF32 || n <= kBf16InPlaceMaxNew);
  if (in_place) {
    // Read in place: copying the whole context per layer per step grew with the context (at
    // 400 tokens and 16 streams it was 12 % of the gateway's CPU; a BF16 cache also converted
    // all of it to F32 each time).
    for (int64_t b = 0; b * bt < ctx; ++b) segments_.push_back(kv.Rows(s.blocks_[b], layer));
    return nullptr;
  }
  if (static_cast<int64_t>(ctx_.size()) < ctx * row) ctx_.resize(ctx * row);
  for (int64_t b = 0; b * bt < ctx; ++b) {
    kv.Read(s.blocks_[b], layer, std::min(bt, ctx - b * bt), ctx_.data() + b * bt * row);
  }
  return ctx_.data();
}

void Engine::InPlaceView(const StepInput& in, AttentionShape* as) const {
  // The sequence's own pool: one made before ConfigureKvCache keeps the old pool's blocks.
  const KvCache& kv = *in.seq->cache_;
  as->segment_rows = kv.block_tokens();
  as->segments = segments_.data();
  as->segment_dtype = kv.options().dtype;
}

absl::Status Engine::MlaAttention(int l, absl::Span<const StepInput> inputs,
                                  absl::Span<const int64_t> starts, const float* xn, int64_t t,
                                  const int32_t* positions, float* out) {
  const Layer& L = *layers_[l];
  const int64_t nh = cfg_.num_heads;
  const int64_t nope = cfg_.qk_nope_head_dim, rope = cfg_.qk_rope_head_dim, vd = cfg_.v_head_dim;
  const int64_t qk = nope + rope, kvl = cfg_.kv_lora_rank, row = kvl + rope;  // row == k_row_

  // q: [t, nh, qk], through the q LoRA (q_a_proj, q_a_layernorm, q_b_proj) or q_proj.
  std::vector<float> q(t * nh * qk);
  if (cfg_.q_lora_rank > 0) {
    const int64_t ql = cfg_.q_lora_rank;
    std::vector<float> qa(t * ql);
    backend_->MatMulW(xn, t, L.wq_a, qa.data());
    backend_->RmsNorm(qa.data(), L.q_a_norm.data(), t, ql, kMlaLatentNormEps, qa.data());
    backend_->MatMulW(qa.data(), t, L.wq_b, q.data());
  } else {
    backend_->MatMulW(xn, t, L.wq, q.data());
  }
  // Decoupled RoPE on the last qk_rope dims of each head, adjacent pairs as DeepSeek does (HF
  // checkpoints store q_b_proj/kv_a_proj unpermuted; HF's modeling code de-interleaves q and k
  // alike before rotate_half, which gives the same dot products).
  backend_->Rope(q.data() + nope, t, nh, qk, nh * qk, rope, positions, inv_freq_.data(),
                 rope_mscale_, /*interleaved=*/true);
  // kv: [t, kv_lora + rope] = [normalised latent | rotated shared key], the cache row.
  std::vector<float> kv(t * row);
  backend_->MatMulW(xn, t, L.wkv_a, kv.data());
  for (int64_t i = 0; i < t; ++i) {
    backend_->RmsNorm(kv.data() + i * row, L.kv_a_norm.data(), 1, kvl, kMlaLatentNormEps,
                      kv.data() + i * row);
  }
  backend_->Rope(kv.data() + kvl, t, 1, row, row, rope, positions, inv_freq_.data(), rope_mscale_,
                 /*interleaved=*/true);

  // Absorbed query per head: [q_nope · W_uk (kv_lora) | q_pe (rope)], so that its dot product
  // with a cache row equals q_nope · k_nope + q_pe · k_pe of the expanded keys.
  std::vector<float> qa(t * nh * row);
  std::vector<float> gather(t * std::max(nope, kvl)), lat(t * kvl);
  for (int64_t hd = 0; hd < nh; ++hd) {
    if (nope > 0) {
      for (int64_t i = 0; i < t; ++i) {
        std::memcpy(gather.data() + i * nope, q.data() + (i * nh + hd) * qk, nope * sizeof(float));
      }
      backend_->MatMulT(gather.data(), t, nope, L.w_uk_t.data() + hd * kvl * nope, kvl, lat.data());
    } else {
      std::fill(lat.begin(), lat.end(), 0.0f);
    }
    for (int64_t i = 0; i < t; ++i) {
      float* dst = qa.data() + (i * nh + hd) * row;
      std::memcpy(dst, lat.data() + i * kvl, kvl * sizeof(float));
      std::memcpy(dst + kvl, q.data() + (i * nh + hd) * qk + nope, rope * sizeof(float));
    }
  }

  // Attention over the latent cache: one shared key/value head (MQA in latent space); the
  // values are the latent part of each cache row.
  std::vector<float> attn(t * nh * kvl);
  int64_t r0 = 0;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const StepInput& in = inputs[i];
    const int64_t n = static_cast<int64_t>(in.tokens.size());
    const float* cache = StoreAndGather(l, in, starts[i], kv.data() + r0 * row);
    AttentionShape as;
    as.num_new = n;
    as.ctx = starts[i] + n;
    as.heads = nh;
    as.kv_heads = 1;
    as.qk_dim = row;
    as.v_dim = kvl;
    as.q_stride = nh * row;
    as.k_stride = row;
    as.v_stride = row;
    as.scale = attn_scale_;
    // In place: the latent is both key (with the rope part) and value.
    if (cache == nullptr) InPlaceView(in, &as);
    backend_->CausalAttention(as, qa.data() + r0 * nh * row, cache, cache,
                              attn.data() + r0 * nh * kvl);
    r0 += n;
  }

  // Per head, expand the attended latent with the value rows of kv_b_proj: [t, nh, v_head].
  std::vector<float> o(t * nh * vd), ov(t * vd);
  for (int64_t hd = 0; hd < nh; ++hd) {
    for (int64_t i = 0; i < t; ++i) {
      std::memcpy(gather.data() + i * kvl, attn.data() + (i * nh + hd) * kvl, kvl * sizeof(float));
    }
    const float* w_uv = L.wkv_b.data() + (hd * (nope + vd) + nope) * kvl;  // [v_head, kv_lora]
    backend_->MatMulT(gather.data(), t, kvl, w_uv, vd, ov.data());
    for (int64_t i = 0; i < t; ++i) {
      std::memcpy(o.data() + (i * nh + hd) * vd, ov.data() + i * vd, vd * sizeof(float));
    }
  }
  backend_->MatMulW(o.data(), t, L.wo, out, /*accumulate=*/true);
  return absl::OkStatus();
}

absl::Status Engine::Attention(int l, absl::Span<const StepInput> inputs,
                               absl::Span<const int64_t> starts, const float* xn, int64_t t,
                               const int32_t* positions, float* out) {
  if (cfg_.IsMla()) return MlaAttention(l, inputs, starts, xn, t, positions, out);
  const Layer& L = *layers_[l];
  const int64_t hd = cfg_.head_dim, nh = cfg_.num_heads, nkv = cfg_.num_kv_heads;
  std::vector<float> q(t * nh * hd), k(t * nkv * hd), v(t * nkv * hd), attn(t * nh * hd);
  backend_->MatMulW(xn, t, L.wq, q.data());
  backend_->MatMulW(xn, t, L.wk, k.data());
  backend_->MatMulW(xn, t, L.wv, v.data());
  backend_->Rope(q.data(), t, nh, hd, nh * hd, hd, positions, inv_freq_.data(), rope_mscale_,
                 false);
  backend_->Rope(k.data(), t, nkv, hd, nkv * hd, hd, positions, inv_freq_.data(), rope_mscale_,
                 false);
  // Cache rows: [K of every KV head | V of every KV head] per token.
  const int64_t cache_row = k_row_ + v_row_;
  std::vector<float> kv(t * cache_row);
  for (int64_t i = 0; i < t; ++i) {
    std::memcpy(kv.data() + i * cache_row, k.data() + i * k_row_, k_row_ * sizeof(float));
    std::memcpy(kv.data() + i * cache_row + k_row_, v.data() + i * v_row_, v_row_ * sizeof(float));
  }
  int64_t row = 0;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const StepInput& in = inputs[i];
    const int64_t n = static_cast<int64_t>(in.tokens.size());
    const float* cache = StoreAndGather(l, in, starts[i], kv.data() + row * cache_row);
    AttentionShape as;
    as.num_new = n;
    as.ctx = starts[i] + n;
    as.heads = nh;
    as.kv_heads = nkv;
    as.qk_dim = hd;
    as.v_dim = hd;
    as.q_stride = nh * hd;
    as.k_stride = cache_row;
    as.v_stride = cache_row;
    as.scale = attn_scale_;
    const float* v_cache = cache == nullptr ? nullptr : cache + k_row_;
    if (cache == nullptr) {  // in place: each block's rows are [K | V]
      InPlaceView(in, &as);
      as.v_offset = k_row_;
    }
    backend_->CausalAttention(as, q.data() + row * nh * hd, cache, v_cache,
                              attn.data() + row * nh * hd);
    row += n;
  }
  backend_->MatMulW(attn.data(), t, L.wo, out, /*accumulate=*/true);
  return absl::OkStatus();
}

absl::StatusOr<std::vector<Tensor>> Engine::Step(absl::Span<const StepInput> inputs,
                                                 const CallOptions& opts) {
  // Memory the system refuses fails the step, not the process.
  absl::StatusOr<std::vector<Tensor>> out;
  const absl::Time start = absl::Now();
  step_split_arm_ = -1;
  try {
    out = StepImpl(inputs, opts);
  } catch (const std::bad_alloc&) {
    out = absl::ResourceExhaustedError("out of memory in an engine step");
  }
  // The gather scratch is as large as the longest context of one layer; past 64 MiB it is
  // given back rather than kept for the next step.
  if (ctx_.capacity() > (size_t{16} << 20)) std::vector<float>().swap(ctx_);
  const double wall_s = absl::ToDoubleSeconds(absl::Now() - start);
  if (out.ok() && step_split_arm_ >= 0) RecordSplit(step_tokens_, step_split_arm_, wall_s);
  {
    absl::MutexLock lock(&profile_mu_);
    ++profile_.steps;
    profile_.wall_s += wall_s;
  }
  return out;
}

namespace {
int SplitBucketOf(int64_t tokens) {
  int b = 0;
  while (b < 39 && (int64_t{2} << b) <= tokens) ++b;
  return b;
}
}  // namespace

int Engine::ChooseSplit(int64_t tokens) {
  absl::MutexLock lock(&split_mu_);
  SplitBucket& b = split_buckets_[SplitBucketOf(tokens)];
  ++b.steps;
  constexpr int64_t kTries = 3, kExploreEvery = 16;
  if (b.arm[0].runs < kTries || b.arm[1].runs < kTries) {
    // Alternate until both are known, split first: what was asked for, and a size that comes
    // rarely (a large prefill step) should not run whole for want of a measurement.
    return b.arm[1].runs <= b.arm[0].runs ? 1 : 0;
  }
  const int best = b.arm[0].seconds_per_token <= b.arm[1].seconds_per_token ? 0 : 1;
  return b.steps % kExploreEvery == 0 ? 1 - best : best;
}

void Engine::RecordSplit(int64_t tokens, int arm, double seconds) {
  absl::MutexLock lock(&split_mu_);
  SplitArm& a = split_buckets_[SplitBucketOf(tokens)].arm[arm];
  double v = seconds / static_cast<double>(tokens);
  // One stalled step (a page fault, a descheduled thread) moves the average at most to 1.25×.
  if (a.runs > 0) v = std::min(v, 2 * a.seconds_per_token);
  a.seconds_per_token = a.runs == 0 ? v : 0.75 * a.seconds_per_token + 0.25 * v;
  ++a.runs;
}

std::pair<int64_t, int64_t> Engine::adaptive_split_counts() const {
  absl::MutexLock lock(&split_mu_);
  std::pair<int64_t, int64_t> c{0, 0};
  for (const SplitBucket& b : split_buckets_) {
    c.first += b.arm[0].runs;
    c.second += b.arm[1].runs;
  }
  return c;
}

absl::Status Engine::set_micro_batches(int n) {
  if (n < 1 || n > 8) {
    return absl::InvalidArgumentError(absl::StrCat("micro_batches must be in [1, 8], got ", n));
  }
  micro_batches_ = n;
  return absl::OkStatus();
}

StepProfile Engine::profile() const {
  absl::MutexLock lock(&profile_mu_);
  return profile_;
}

// One micro-batch: rows [r0, r1) of the step, as inputs over sub-spans of the step's inputs.
struct Engine::Part {
  int64_t r0 = 0, r1 = 0;
  std::vector<StepInput> inputs;
  std::vector<int64_t> starts;  // position of each input's first new token
  Tensor xn;                    // [r1 - r0, hidden]: the input of the MoE call in flight
  // The MoE call in flight, if any: its layer and where its result lands.
  struct Pending {
    absl::Mutex mu;
    bool done ABSL_GUARDED_BY(mu) = false;
    absl::StatusOr<Tensor> result ABSL_GUARDED_BY(mu);
  };
  std::shared_ptr<Pending> pending;
  int pending_layer = -1;
};

absl::StatusOr<std::vector<Tensor>> Engine::StepImpl(absl::Span<const StepInput> inputs,
                                                     const CallOptions& opts) {
  const int64_t h = cfg_.hidden_size;
  int64_t t = 0;
  for (const StepInput& in : inputs) {
    if (in.seq == nullptr) return absl::InvalidArgumentError("step input without a sequence");
    if (in.tokens.empty()) return absl::InvalidArgumentError("step input without tokens");
    for (int32_t tok : in.tokens) {
      if (tok < 0 || tok >= cfg_.vocab_size) {
        return absl::InvalidArgumentError(absl::StrCat(
            "token id ", tok, " is outside the vocabulary [0, ", cfg_.vocab_size, ")"));
      }
    }
    const int64_t end = in.seq->length_ + static_cast<int64_t>(in.tokens.size());
    if (end > cfg_.max_position_embeddings) {
      return absl::InvalidArgumentError(absl::StrCat("sequence of ", end,
                                                     " tokens exceeds max_position_embeddings ",
                                                     cfg_.max_position_embeddings));
    }
    t += static_cast<int64_t>(in.tokens.size());
  }
  if (t == 0) return std::vector<Tensor>{};

  for (const StepInput& in : inputs) {
    if (!Reserve(in.seq, in.seq->length_ + static_cast<int64_t>(in.tokens.size()))) {
      return absl::ResourceExhaustedError(
          absl::StrCat("the KV cache has no free blocks for ", in.tokens.size(), " more tokens (",
                       kv_->free_blocks(), " of ", kv_->total_blocks(), " blocks free)"));
    }
  }
  std::vector<int32_t> positions;
  positions.reserve(t);
  Tensor x = Tensor::Zeros({t, h});
  {
    int64_t r = 0;
    for (const StepInput& in : inputs) {
      for (size_t i = 0; i < in.tokens.size(); ++i, ++r) {
        DequantizeRows(embed_, in.tokens[i], in.tokens[i] + 1, x.mutable_row(r));
        positions.push_back(static_cast<int32_t>(in.seq->length_ + i));
      }
    }
  }
  // The micro-batches: the step's rows cut into nearly equal token counts, inputs in order. A
  // prefill chunk that straddles a cut goes to both sides, its first rows in one part and the
  // rest in the next: the later part's attention reads the earlier part's keys, which the
  // earlier part writes first in every layer. Attention runs one query row at a time and every
  // product is row-invariant, so where a step is cut changes no logit (micro_batch_test).
  int want_parts = micro_batches_;
  if (micro_batches_ > 1 && t > 1 && micro_batch_policy_ == MicroBatchPolicy::kAdaptive) {
    step_split_arm_ = ChooseSplit(t);  // Step records how long the choice took
    step_tokens_ = t;
    if (step_split_arm_ == 0) want_parts = 1;
  }
  const int nparts = static_cast<int>(std::min<int64_t>(want_parts, t));
  std::vector<Part> parts(nparts);
  {
    const bool decode = t == static_cast<int64_t>(inputs.size());
    absl::MutexLock lock(&profile_mu_);
    ++profile_.by_parts[decode ? 0 : 1][nparts];
  }
  {
    size_t i = 0;     // the input being placed
    int64_t off = 0;  // its tokens placed already
    int64_t r = 0;    // rows placed
    for (int p = 0; p < nparts; ++p) {
      Part& part = parts[p];
      part.r0 = r;
      for (const int64_t end = t * (p + 1) / nparts; r < end;) {
        const StepInput& in = inputs[i];
        const int64_t size = static_cast<int64_t>(in.tokens.size());
        const int64_t take = std::min(size - off, end - r);
        StepInput piece = in;
        piece.tokens = in.tokens.subspan(off, take);
        part.inputs.push_back(piece);
        part.starts.push_back(in.seq->length_ + off);
        r += take;
        off += take;
        if (off == size) {
          ++i;
          off = 0;
        }
      }
      part.r1 = r;
      part.xn = Tensor::Zeros({part.r1 - part.r0, h});
    }
  }
  double wait_s = 0;
  // This step's stage times (StepProfile), added to the profile when the step ends either way.
  double attention_s = 0, moe_call_s = 0, dense_ffn_s = 0, lm_head_s = 0;
  using StageClock = std::chrono::steady_clock;
  auto since = [](StageClock::time_point t0) {
    return std::chrono::duration<double>(StageClock::now() - t0).count();
  };
  auto add_profile = [&] {
    absl::MutexLock lock(&profile_mu_);
    profile_.moe_wait_s += wait_s;
    profile_.attention_s += attention_s;
    profile_.moe_call_s += moe_call_s;
    profile_.dense_ffn_s += dense_ffn_s;
    profile_.lm_head_s += lm_head_s;
  };
  // Waits for a part's MoE call in flight and adds its result to the part's rows of x.
  auto collect = [&](Part& part) -> absl::Status {
    if (!part.pending) return absl::OkStatus();
    const absl::Time a = absl::Now();
    absl::StatusOr<Tensor> r;
    {
      Part::Pending& pd = *part.pending;
      absl::MutexLock lock(&pd.mu);
      pd.mu.Await(absl::Condition(&pd.done));
      r = std::move(pd.result);
    }
    wait_s += absl::ToDoubleSeconds(absl::Now() - a);
    part.pending.reset();
    const int layer = part.pending_layer;
    const int64_t n = part.r1 - part.r0;
    RETURN_IF_ERROR(r.status(), absl::StrCat("MoE layer ", layer));
    if (r->numel() != n * h) {
      return absl::InternalError(absl::StrCat("MoE layer ", layer, " returned ", r->ShapeString()));
    }
    float* xd = x.mutable_row(part.r0);
    const float* md = r->data();
    for (int64_t i = 0; i < n * h; ++i) xd[i] += md[i];
    return absl::OkStatus();
  };
  // Every call in flight is waited for before Step returns, error or not: the callbacks
  // write into the parts.
  auto fail = [&](absl::Status s) {
    for (Part& part : parts) collect(part).IgnoreError();
    add_profile();
    return s;
  };
  int64_t widest = 0;
  for (const Part& part : parts) widest = std::max(widest, part.r1 - part.r0);
  Tensor xa = Tensor::Zeros({widest, h});  // attention's normalised input, one part at a time
  std::vector<float> work;
  for (int l = 0; l < cfg_.num_layers; ++l) {
    const Layer& L = *layers_[l];
    for (Part& part : parts) {
      if (absl::Status s = collect(part); !s.ok()) return fail(s);
      const int64_t n = part.r1 - part.r0;
      float* xp = x.mutable_row(part.r0);
      StageClock::time_point t0 = StageClock::now();
      backend_->RmsNorm(xp, L.input_norm.data(), n, h, cfg_.rms_norm_eps, xa.mutable_data());
      if (absl::Status s =
              Attention(l, part.inputs, part.starts, xa.data(), n, positions.data() + part.r0, xp);
          !s.ok()) {
        return fail(s);
      }
      attention_s += since(t0);
      t0 = StageClock::now();
      backend_->RmsNorm(xp, L.post_norm.data(), n, h, cfg_.rms_norm_eps, part.xn.mutable_data());
      if (L.dense) {
        const int64_t inter = L.w1.rows;
        work.resize(2 * n * inter);
        Tensor y = Tensor::Zeros({n, h});
        backend_->ExpertFfnW(part.xn.data(), n, L.w1, L.w3, L.w2, work.data(), y.mutable_data());
        for (int64_t i = 0; i < n * h; ++i) xp[i] += y.data()[i];
        dense_ffn_s += since(t0);
        continue;
      }
      if (opts.cancel && opts.cancel->cancelled()) {
        return fail(absl::CancelledError("step cancelled"));
      }
      auto pending = std::make_shared<Part::Pending>();
      part.pending = pending;
      part.pending_layer = l;
      moe_->StartForward(l, part.xn, opts, [pending](absl::StatusOr<Tensor> r) {
        absl::MutexLock lock(&pending->mu);
        pending->result = std::move(r);
        pending->done = true;
      });
      moe_call_s += since(t0);
    }
  }

  // Final norm and LM head, only on the rows whose logits are wanted; each part's as soon as
  // its last MoE result is in, while the others' may still be in flight.
  std::vector<int64_t> rows;
  std::vector<std::pair<int64_t, int64_t>> spans;  // per input: first row in `rows`, count
  {
    int64_t r = 0;
    for (const StepInput& in : inputs) {
      const int64_t n = static_cast<int64_t>(in.tokens.size());
      const int64_t first = static_cast<int64_t>(rows.size());
      if (in.all_logits) {
        for (int64_t i = 0; i < n; ++i) rows.push_back(r + i);
      } else {
        rows.push_back(r + n - 1);
      }
      spans.push_back({first, static_cast<int64_t>(rows.size()) - first});
      r += n;
    }
  }
  const int64_t nr = static_cast<int64_t>(rows.size());
  Tensor logits = Tensor::Zeros({nr, cfg_.vocab_size});
  {
    size_t next = 0;  // rows are increasing: each part's are a contiguous run
    for (Part& part : parts) {
      if (absl::Status s = collect(part); !s.ok()) return fail(s);
      const size_t first = next;
      while (next < rows.size() && rows[next] < part.r1) ++next;
      const int64_t m = static_cast<int64_t>(next - first);
      if (m == 0) continue;
      const StageClock::time_point t0 = StageClock::now();
      Tensor sel = Tensor::Zeros({m, h});
      for (int64_t i = 0; i < m; ++i) {
        backend_->RmsNorm(x.row(rows[first + i]), norm_.data(), 1, h, cfg_.rms_norm_eps,
                          sel.mutable_row(i));
      }
      backend_->MatMulW(sel.data(), m, lm_head_, logits.mutable_row(static_cast<int64_t>(first)));
      lm_head_s += since(t0);
    }
  }
  add_profile();

  std::vector<Tensor> out;
  out.reserve(inputs.size());
  for (size_t i = 0; i < inputs.size(); ++i) {
    const auto [first, count] = spans[i];
    if (inputs.size() == 1) {
      out.push_back(logits);
    } else {
      Tensor part = Tensor::Zeros({count, cfg_.vocab_size});
      std::memcpy(part.mutable_data(), logits.row(first), count * cfg_.vocab_size * sizeof(float));
      out.push_back(std::move(part));
    }
    Sequence& seq = *inputs[i].seq;
    seq.length_ += static_cast<int64_t>(inputs[i].tokens.size());
    seq.tokens_.insert(seq.tokens_.end(), inputs[i].tokens.begin(), inputs[i].tokens.end());
    // Blocks filled by this step become findable by sequences with the same prefix.
    KvCache& kv = *seq.cache_;
    const int64_t bt = kv.block_tokens();
    while (static_cast<int64_t>(seq.hashes_.size()) < seq.length_ / bt) {
      const int64_t b = static_cast<int64_t>(seq.hashes_.size());
      const uint64_t parent = b == 0 ? 0 : seq.hashes_.back();
      const auto block_tokens = absl::MakeConstSpan(seq.tokens_).subspan(b * bt, bt);
      kv.Register(seq.blocks_[b], parent, block_tokens);
      seq.hashes_.push_back(KvCache::ChainHash(parent, block_tokens));
    }
  }
  return out;
}

absl::StatusOr<Tensor> Engine::Score(absl::Span<const int32_t> tokens, const CallOptions& opts) {
  if (tokens.empty()) return absl::InvalidArgumentError("no tokens to score");
  auto seq = NewSequence();
  StepInput in{seq.get(), tokens, true};
  ASSIGN_OR_RETURN(std::vector<Tensor> r, Step({&in, 1}, opts));
  return r[0];
}

}  // namespace moemesh
