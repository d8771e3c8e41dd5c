#include "services/engine/engine.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "services/common/status_macros.h"

namespace moemesh {

struct Engine::Layer {
  Tensor input_norm;  // [hidden]
  Tensor post_norm;   // [hidden]
  // GQA attention (Mixtral).
  Tensor wq;  // [heads * head_dim, hidden]
  Tensor wk;  // [kv_heads * head_dim, hidden]
  Tensor wv;  // [kv_heads * head_dim, hidden]
  Tensor wo;  // [hidden, heads * head_dim]
  // Dense FFN for layers that are not MoE layers.
  bool dense = false;
  Tensor w1, w3, w2;
};

Engine::~Engine() = default;

absl::StatusOr<std::unique_ptr<Engine>> Engine::Load(const Checkpoint& ckpt, const ModelConfig& cfg,
                                                     ComputeBackend* backend, MoeLayer* moe) {
  std::unique_ptr<Engine> e(new Engine());
  e->cfg_ = cfg;
  e->backend_ = backend;
  e->moe_ = moe;
  const int64_t h = cfg.hidden_size, v = cfg.vocab_size;
  ASSIGN_OR_RETURN(e->embed_, ckpt.LoadF32("model.embed_tokens.weight", std::vector<int64_t>{v, h}));
  ASSIGN_OR_RETURN(e->norm_, ckpt.LoadF32("model.norm.weight", std::vector<int64_t>{h}));
  if (cfg.tie_word_embeddings && !ckpt.Has("lm_head.weight")) {
    e->lm_head_ = e->embed_;
  } else {
    ASSIGN_OR_RETURN(e->lm_head_, ckpt.LoadF32("lm_head.weight", std::vector<int64_t>{v, h}));
  }
  const int64_t hd = cfg.head_dim, nh = cfg.num_heads, nkv = cfg.num_kv_heads;
  for (int l = 0; l < cfg.num_layers; ++l) {
    auto layer = std::make_unique<Layer>();
    const std::string p = LayerPrefix(l);
    ASSIGN_OR_RETURN(layer->input_norm, ckpt.LoadF32(p + "input_layernorm.weight", std::vector<int64_t>{h}));
    ASSIGN_OR_RETURN(layer->post_norm, ckpt.LoadF32(p + "post_attention_layernorm.weight", std::vector<int64_t>{h}));
    ASSIGN_OR_RETURN(layer->wq, ckpt.LoadF32(p + "self_attn.q_proj.weight", std::vector<int64_t>{nh * hd, h}));
    ASSIGN_OR_RETURN(layer->wk, ckpt.LoadF32(p + "self_attn.k_proj.weight", std::vector<int64_t>{nkv * hd, h}));
    ASSIGN_OR_RETURN(layer->wv, ckpt.LoadF32(p + "self_attn.v_proj.weight", std::vector<int64_t>{nkv * hd, h}));
    ASSIGN_OR_RETURN(layer->wo, ckpt.LoadF32(p + "self_attn.o_proj.weight", std::vector<int64_t>{h, nh * hd}));
    if (!cfg.IsMoeLayer(l)) {
      layer->dense = true;
      const ExpertTensorNames n = DenseMlpNames(cfg, l);
      const int64_t inter = cfg.intermediate_size;
      ASSIGN_OR_RETURN(layer->w1, ckpt.LoadF32(n.gate, std::vector<int64_t>{inter, h}));
      ASSIGN_OR_RETURN(layer->w3, ckpt.LoadF32(n.up, std::vector<int64_t>{inter, h}));
      ASSIGN_OR_RETURN(layer->w2, ckpt.LoadF32(n.down, std::vector<int64_t>{h, inter}));
    }
    e->layers_.push_back(std::move(layer));
  }
  // HF: inv_freq[i] = theta^(-2i / head_dim), computed in float32 as HF does.
  for (int64_t i = 0; i < hd / 2; ++i) {
    e->inv_freq_.push_back(1.0f / std::pow(cfg.rope_theta, static_cast<float>(2 * i) / static_cast<float>(hd)));
  }
  e->attn_scale_ = 1.0f / std::sqrt(static_cast<float>(hd));
  e->k_row_ = nkv * hd;
  e->v_row_ = nkv * hd;
  return e;
}

std::unique_ptr<Sequence> Engine::NewSequence() const {
  auto s = std::make_unique<Sequence>();
  s->k_.resize(cfg_.num_layers);
  s->v_.resize(cfg_.num_layers);
  return s;
}

void Engine::Reserve(Sequence* seq, int64_t needed) const {
  if (needed <= seq->capacity_) return;
  int64_t cap = std::max<int64_t>(64, seq->capacity_);
  while (cap < needed) cap *= 2;
  cap = std::min<int64_t>(cap, std::max<int64_t>(needed, cfg_.max_position_embeddings));
  for (int l = 0; l < cfg_.num_layers; ++l) {
    seq->k_[l].resize(cap * k_row_);
    seq->v_[l].resize(cap * v_row_);
  }
  seq->capacity_ = cap;
}

absl::Status Engine::Attention(int l, absl::Span<const StepInput> inputs, const float* xn, int64_t t,
                               const std::vector<int32_t>& positions, float* out) {
  const Layer& L = *layers_[l];
  const int64_t h = cfg_.hidden_size, hd = cfg_.head_dim, nh = cfg_.num_heads, nkv = cfg_.num_kv_heads;
  std::vector<float> q(t * nh * hd), k(t * nkv * hd), v(t * nkv * hd), attn(t * nh * hd);
  backend_->MatMulT(xn, t, h, L.wq.data(), nh * hd, q.data());
  backend_->MatMulT(xn, t, h, L.wk.data(), nkv * hd, k.data());
  backend_->MatMulT(xn, t, h, L.wv.data(), nkv * hd, v.data());
  backend_->Rope(q.data(), t, nh, hd, nh * hd, hd, positions.data(), inv_freq_.data(), rope_mscale_, false);
  backend_->Rope(k.data(), t, nkv, hd, nkv * hd, hd, positions.data(), inv_freq_.data(), rope_mscale_, false);
  int64_t row = 0;
  for (const StepInput& in : inputs) {
    Sequence* s = in.seq;
    const int64_t n = static_cast<int64_t>(in.tokens.size());
    std::memcpy(s->k_[l].data() + s->length_ * k_row_, k.data() + row * k_row_, n * k_row_ * sizeof(float));
    std::memcpy(s->v_[l].data() + s->length_ * v_row_, v.data() + row * v_row_, n * v_row_ * sizeof(float));
    AttentionShape as;
    as.num_new = n;
    as.ctx = s->length_ + n;
    as.heads = nh;
    as.kv_heads = nkv;
    as.qk_dim = hd;
    as.v_dim = hd;
    as.q_stride = nh * hd;
    as.k_stride = k_row_;
    as.v_stride = v_row_;
    as.scale = attn_scale_;
    backend_->CausalAttention(as, q.data() + row * nh * hd, s->k_[l].data(), s->v_[l].data(),
                              attn.data() + row * nh * hd);
    row += n;
  }
  backend_->MatMulT(attn.data(), t, nh * hd, L.wo.data(), h, out, /*accumulate=*/true);
  return absl::OkStatus();
}

absl::StatusOr<std::vector<Tensor>> Engine::Step(absl::Span<const StepInput> inputs,
                                                 const CallOptions& opts) {
  const int64_t h = cfg_.hidden_size;
  int64_t t = 0;
  for (const StepInput& in : inputs) {
    if (in.seq == nullptr) return absl::InvalidArgumentError("step input without a sequence");
    if (in.tokens.empty()) return absl::InvalidArgumentError("step input without tokens");
    for (int32_t tok : in.tokens) {
      if (tok < 0 || tok >= cfg_.vocab_size) {
        return absl::InvalidArgumentError(absl::StrCat("token id ", tok, " is outside the vocabulary [0, ",
                                                       cfg_.vocab_size, ")"));
      }
    }
    const int64_t end = in.seq->length_ + static_cast<int64_t>(in.tokens.size());
    if (end > cfg_.max_position_embeddings) {
      return absl::InvalidArgumentError(absl::StrCat("sequence of ", end, " tokens exceeds max_position_embeddings ",
                                                     cfg_.max_position_embeddings));
    }
    t += static_cast<int64_t>(in.tokens.size());
  }
  if (t == 0) return std::vector<Tensor>{};

  std::vector<int32_t> positions;
  positions.reserve(t);
  Tensor x = Tensor::Zeros({t, h});
  {
    int64_t r = 0;
    for (const StepInput& in : inputs) {
      Reserve(in.seq, in.seq->length_ + static_cast<int64_t>(in.tokens.size()));
      for (size_t i = 0; i < in.tokens.size(); ++i, ++r) {
        std::memcpy(x.mutable_row(r), embed_.row(in.tokens[i]), h * sizeof(float));
        positions.push_back(static_cast<int32_t>(in.seq->length_ + i));
      }
    }
  }
  Tensor xn = Tensor::Zeros({t, h});
  std::vector<float> work;
  for (int l = 0; l < cfg_.num_layers; ++l) {
    const Layer& L = *layers_[l];
    backend_->RmsNorm(x.data(), L.input_norm.data(), t, h, cfg_.rms_norm_eps, xn.mutable_data());
    RETURN_IF_ERROR(Attention(l, inputs, xn.data(), t, positions, x.mutable_data()));
    backend_->RmsNorm(x.data(), L.post_norm.data(), t, h, cfg_.rms_norm_eps, xn.mutable_data());
    if (L.dense) {
      const int64_t inter = L.w1.dim(0);
      work.resize(2 * t * inter);
      Tensor y = Tensor::Zeros({t, h});
      backend_->ExpertFfn(xn.data(), t, h, inter, L.w1.data(), L.w3.data(), L.w2.data(), work.data(),
                          y.mutable_data());
      float* xd = x.mutable_data();
      for (int64_t i = 0; i < t * h; ++i) xd[i] += y.data()[i];
    } else {
      if (opts.cancel && opts.cancel->cancelled()) return absl::CancelledError("step cancelled");
      ASSIGN_OR_RETURN(Tensor moe_out, moe_->Forward(l, xn, opts), absl::StrCat("MoE layer ", l));
      if (moe_out.numel() != t * h) {
        return absl::InternalError(absl::StrCat("MoE layer ", l, " returned ", moe_out.ShapeString()));
      }
      float* xd = x.mutable_data();
      const float* md = moe_out.data();
      for (int64_t i = 0; i < t * h; ++i) xd[i] += md[i];
    }
  }

  // Final norm and LM head, only on the rows whose logits are wanted.
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
  Tensor sel = Tensor::Zeros({nr, h});
  for (int64_t i = 0; i < nr; ++i) {
    backend_->RmsNorm(x.row(rows[i]), norm_.data(), 1, h, cfg_.rms_norm_eps, sel.mutable_row(i));
  }
  Tensor logits = Tensor::Zeros({nr, cfg_.vocab_size});
  backend_->MatMulT(sel.data(), nr, h, lm_head_.data(), cfg_.vocab_size, logits.mutable_data());

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
    inputs[i].seq->length_ += static_cast<int64_t>(inputs[i].tokens.size());
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
