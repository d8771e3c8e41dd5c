// Gating: turns a layer's normalised hidden states into per-token (expert, weight) choices.
//
// Mixtral: softmax over the router logits, top-k, renormalised over the chosen k
// (HF modeling_mixtral). DeepSeek-V3: sigmoid scores, score-correction bias for selection
// only, group-limited top-k, weights from unbiased scores (DeepSeek's inference/model.py).
// The same Gate runs in the single-process engine and in the router service.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "services/compute/backend.h"
#include "services/model/config.h"
#include "services/tensor/tensor.h"

namespace moemesh {

struct RoutingConfig {
  int num_experts = 0;
  int top_k = 2;
  ScoringFunc scoring = ScoringFunc::kSoftmax;
  bool norm_topk_prob = true;
  float routed_scaling_factor = 1.0f;
  int n_group = 1;
  int topk_group = 1;
  static RoutingConfig From(const ModelConfig& cfg);
};

// Top-k choices of T tokens: ids and weights are [T, k], each row in descending weight.
struct Routing {
  int k = 0;
  std::vector<int32_t> ids;
  std::vector<float> weights;
};

// DeepSeek-V3 selection on one token: scores[e] are sigmoid scores, bias[e] the correction
// (may be null). Writes k ids and weights. Exposed for golden tests.
void SigmoidGroupTopK(const float* scores, const float* bias, const RoutingConfig& rc,
                      int32_t* ids, float* weights);

class Gate {
 public:
  // weight: [num_experts, hidden]; bias: [num_experts] or empty.
  Gate(RoutingConfig rc, Tensor weight, Tensor bias) : rc_(rc), weight_(std::move(weight)), bias_(std::move(bias)) {}
  const RoutingConfig& config() const { return rc_; }
  int64_t hidden() const { return weight_.dim(1); }
  // hidden: [T, hidden]. Thread-safe.
  Routing Route(const float* hidden, int64_t t, ComputeBackend* backend) const;

 private:
  RoutingConfig rc_;
  Tensor weight_;
  Tensor bias_;
};

}  // namespace moemesh
