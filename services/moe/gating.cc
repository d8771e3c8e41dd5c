#include "services/moe/gating.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <numeric>
#include <utility>

namespace moemesh {

RoutingConfig RoutingConfig::From(const ModelConfig& cfg) {
  RoutingConfig rc;
  rc.num_experts = cfg.num_experts;
  rc.top_k = cfg.top_k;
  rc.scoring = cfg.scoring;
  rc.norm_topk_prob = cfg.norm_topk_prob;
  rc.routed_scaling_factor = cfg.routed_scaling_factor;
  if (cfg.topk_method == TopkMethod::kNoauxTc) {
    rc.n_group = std::max(1, cfg.n_group);
    rc.topk_group = std::max(1, cfg.topk_group);
    rc.use_bias = true;
  } else {
    rc.n_group = 1;
    rc.topk_group = 1;
    rc.use_bias = false;
  }
  return rc;
}

void GroupLimitedTopK(const float* scores, const float* bias, const RoutingConfig& rc, int32_t* ids,
                      float* weights) {
  const int e = rc.num_experts;
  const int k = std::min(rc.top_k, e);
  std::vector<float> sel(scores, scores + e);
  if (bias != nullptr) {
    for (int i = 0; i < e; ++i) sel[i] += bias[i];
  }
  if (rc.n_group > 1 && rc.topk_group < rc.n_group && e % rc.n_group == 0) {
    const int per = e / rc.n_group;
    std::vector<float> gscore(rc.n_group);
    for (int g = 0; g < rc.n_group; ++g) {
      const float* v = sel.data() + g * per;
      if (bias == nullptr) {
        gscore[g] = *std::max_element(v, v + per);  // DeepSeek: amax when the gate has no bias
      } else {
        // Sum of the two largest (a group of one expert contributes its only score).
        float a = -std::numeric_limits<float>::infinity(), b = a;
        for (int i = 0; i < per; ++i) {
          if (v[i] > a) {
            b = a;
            a = v[i];
          } else if (v[i] > b) {
            b = v[i];
          }
        }
        gscore[g] = per > 1 ? a + b : a;
      }
    }
    std::vector<int> gorder(rc.n_group);
    std::iota(gorder.begin(), gorder.end(), 0);
    std::stable_sort(gorder.begin(), gorder.end(),
                     [&](int a, int b) { return gscore[a] > gscore[b]; });
    std::vector<bool> keep(rc.n_group, false);
    for (int i = 0; i < rc.topk_group; ++i) keep[gorder[i]] = true;
    // Masked groups get -inf, as DeepSeek's inference/model.py does (masked_fill with -inf).
    // Some Hugging Face versions of modeling_deepseek.py instead multiply by the group mask,
    // i.e. set masked scores to 0.0. Scores plus bias can be negative (the bias is), and then
    // a 0.0 in a masked group beats a kept expert, so those versions can choose an expert
    // outside the kept groups. moemesh follows DeepSeek's code; golden tests pin it.
    for (int g = 0; g < rc.n_group; ++g) {
      if (keep[g]) continue;
      for (int i = g * per; i < (g + 1) * per; ++i)
        sel[i] = -std::numeric_limits<float>::infinity();
    }
  }
  std::vector<int32_t> order(e);
  std::iota(order.begin(), order.end(), 0);
  std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int32_t a, int32_t b) {
    return sel[a] > sel[b] || (sel[a] == sel[b] && a < b);
  });
  float sum = 0;
  for (int i = 0; i < k; ++i) sum += scores[order[i]];
  for (int i = 0; i < k; ++i) {
    ids[i] = order[i];
    float w = scores[order[i]];
    if (rc.norm_topk_prob && sum > 0.0f) w /= sum;
    weights[i] = w * rc.routed_scaling_factor;
  }
}

Gate::Gate(RoutingConfig rc, Tensor weight, Tensor bias) : rc_(rc), bias_(std::move(bias)) {
  auto held = std::make_shared<Tensor>(std::move(weight));
  weight_.dtype = DType::kF32;
  weight_.rows = held->dim(0);
  weight_.cols = held->dim(1);
  weight_.data = held->data();
  weight_.owner = std::move(held);
}

Routing Gate::Route(const float* hidden, int64_t t, ComputeBackend* backend) const {
  Routing r;
  r.k = rc_.top_k;
  r.ids.resize(t * r.k);
  r.weights.resize(t * r.k);
  std::vector<float> logits(t * rc_.num_experts);
  backend->MatMulW(hidden, t, weight_, logits.data());
  const bool with_bias = rc_.use_bias && !bias_.empty();
  if (rc_.scoring == ScoringFunc::kSoftmax && rc_.n_group <= 1 && !with_bias) {
    // Mixtral (and DeepSeek with greedy softmax routing): the backend's fused kernel.
    backend->SoftmaxTopK(logits.data(), t, rc_.num_experts, r.k, rc_.norm_topk_prob, r.ids.data(),
                         r.weights.data());
    if (rc_.routed_scaling_factor != 1.0f) {
      for (float& w : r.weights) w *= rc_.routed_scaling_factor;
    }
    return r;
  }
  const int64_t e = rc_.num_experts;
  if (rc_.scoring == ScoringFunc::kSigmoid) {
    for (float& l : logits) l = 1.0f / (1.0f + std::exp(-l));
  } else {
    for (int64_t i = 0; i < t; ++i) {
      float* l = logits.data() + i * e;
      const float mx = *std::max_element(l, l + e);
      float sum = 0;
      for (int64_t j = 0; j < e; ++j) sum += (l[j] = std::exp(l[j] - mx));
      for (int64_t j = 0; j < e; ++j) l[j] /= sum;
    }
  }
  for (int64_t i = 0; i < t; ++i) {
    GroupLimitedTopK(logits.data() + i * e, with_bias ? bias_.data() : nullptr, rc_,
                     r.ids.data() + i * r.k, r.weights.data() + i * r.k);
  }
  return r;
}

}  // namespace moemesh
