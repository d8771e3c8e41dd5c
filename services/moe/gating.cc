#include "services/moe/gating.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

namespace moemesh {

RoutingConfig RoutingConfig::From(const ModelConfig& cfg) {
  RoutingConfig rc;
  rc.num_experts = cfg.num_experts;
  rc.top_k = cfg.top_k;
  rc.scoring = cfg.scoring;
  rc.norm_topk_prob = cfg.norm_topk_prob;
  rc.routed_scaling_factor = cfg.routed_scaling_factor;
  rc.n_group = std::max(1, cfg.n_group);
  rc.topk_group = std::max(1, cfg.topk_group);
  return rc;
}

void SigmoidGroupTopK(const float* scores, const float* bias, const RoutingConfig& rc,
                      int32_t* ids, float* weights) {
  const int e = rc.num_experts;
  std::vector<float> biased(scores, scores + e);
  if (bias != nullptr) {
    for (int i = 0; i < e; ++i) biased[i] += bias[i];
  }
  if (rc.n_group > 1) {
    // Group score: the sum of the two largest biased scores in the group (noaux_tc).
    const int per = e / rc.n_group;
    std::vector<float> gscore(rc.n_group);
    for (int g = 0; g < rc.n_group; ++g) {
      std::vector<float> v(biased.begin() + g * per, biased.begin() + (g + 1) * per);
      std::partial_sort(v.begin(), v.begin() + std::min(2, per), v.end(), std::greater<float>());
      gscore[g] = v[0] + (per > 1 ? v[1] : 0.0f);
    }
    std::vector<int> gorder(rc.n_group);
    std::iota(gorder.begin(), gorder.end(), 0);
    std::stable_sort(gorder.begin(), gorder.end(),
                     [&](int a, int b) { return gscore[a] > gscore[b]; });
    std::vector<bool> keep(rc.n_group, false);
    for (int i = 0; i < rc.topk_group; ++i) keep[gorder[i]] = true;
    // Masked groups get -inf, as DeepSeek's inference code does (not 0.0 as some HF
    // versions do, which can select a masked expert when kept scores are negative).
    for (int g = 0; g < rc.n_group; ++g) {
      if (!keep[g]) {
        for (int i = g * per; i < (g + 1) * per; ++i) biased[i] = -std::numeric_limits<float>::infinity();
      }
    }
  }
  std::vector<int32_t> order(e);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t a, int32_t b) { return biased[a] > biased[b]; });
  float sum = 0;
  for (int i = 0; i < rc.top_k; ++i) sum += scores[order[i]];
  for (int i = 0; i < rc.top_k; ++i) {
    ids[i] = order[i];
    float w = scores[order[i]];
    if (rc.norm_topk_prob) w /= sum;
    weights[i] = w * rc.routed_scaling_factor;
  }
}

Routing Gate::Route(const float* hidden, int64_t t, ComputeBackend* backend) const {
  Routing r;
  r.k = rc_.top_k;
  r.ids.resize(t * r.k);
  r.weights.resize(t * r.k);
  std::vector<float> logits(t * rc_.num_experts);
  backend->MatMulT(hidden, t, weight_.dim(1), weight_.data(), rc_.num_experts, logits.data());
  if (rc_.scoring == ScoringFunc::kSoftmax) {
    backend->SoftmaxTopK(logits.data(), t, rc_.num_experts, r.k, rc_.norm_topk_prob, r.ids.data(),
                         r.weights.data());
    if (rc_.routed_scaling_factor != 1.0f) {
      for (float& w : r.weights) w *= rc_.routed_scaling_factor;
    }
    return r;
  }
  for (float& l : logits) l = 1.0f / (1.0f + std::exp(-l));
  for (int64_t i = 0; i < t; ++i) {
    SigmoidGroupTopK(logits.data() + i * rc_.num_experts, bias_.empty() ? nullptr : bias_.data(),
                     rc_, r.ids.data() + i * r.k, r.weights.data() + i * r.k);
  }
  return r;
}

}  // namespace moemesh
