// Gating: turns a layer's normalised hidden states into per-token (expert, weight) choices.
//
// Mixtral: softmax over the router logits, top-k, renormalised over the chosen k
// (HF modeling_mixtral). DeepSeek-V3: sigmoid scores, score-correction bias for selection
// only, group-limited top-k, weights from unbiased scores (the Gate of DeepSeek's
// inference/model.py, see GroupLimitedTopK). The same Gate runs in the single-process engine
// and in the router service.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "services/compute/backend.h"
#include "services/model/config.h"
#include "services/tensor/tensor.h"
#include "services/tensor/weight.h"

namespace moemesh {

struct RoutingConfig {
  int num_experts = 0;
  int top_k = 2;
  ScoringFunc scoring = ScoringFunc::kSoftmax;
  bool norm_topk_prob = true;
  float routed_scaling_factor = 1.0f;
  int n_group = 1;       // groups of experts; group limiting applies when > 1
  int topk_group = 1;    // groups kept per token
  bool use_bias = true;  // add the score-correction bias (when the gate has one) for selection
  // topk_method greedy gives n_group = topk_group = 1 and use_bias = false (as HF does).
  static RoutingConfig From(const ModelConfig& cfg);
};

// Top-k choices of T tokens: ids and weights are [T, k]. Each row is in selection order:
// descending score (+ bias), lower expert id first on ties; without a bias that is descending
// weight.
struct Routing {
  int k = 0;
  std::vector<int32_t> ids;
  std::vector<float> weights;
};

// DeepSeek-V3 selection on one token, as the Gate of DeepSeek's inference/model.py:
//   1. scores[e] are the activated router scores (sigmoid, or softmax);
//   2. bias[e] (e_score_correction_bias, may be null) is added, for selection only;
//   3. with n_group > 1, each group is scored by the sum of its top-2 biased scores (by its
//      largest score when there is no bias), the best topk_group groups are kept and the
//      others masked with -inf;
//   4. the top-k experts are taken from the masked, biased scores;
//   5. their weights are the unbiased scores, divided by their sum when norm_topk_prob, and
//      multiplied by routed_scaling_factor.
// Ties (of groups and of experts) go to the lower index. Writes k ids and weights.
void GroupLimitedTopK(const float* scores, const float* bias, const RoutingConfig& rc, int32_t* ids,
                      float* weights);
// The former name of GroupLimitedTopK.
inline void SigmoidGroupTopK(const float* scores, const float* bias, const RoutingConfig& rc,
                             int32_t* ids, float* weights) {
  GroupLimitedTopK(scores, bias, rc, ids, weights);
}

class Gate {
 public:
  // weight: [num_experts, hidden] in its checkpoint's dtype (DeepSeek's BF16 gates stay BF16:
  // the kernels multiply them exactly as their F32 upcast); bias: [num_experts] or empty.
  Gate(RoutingConfig rc, Weight weight, Tensor bias)
      : rc_(rc), weight_(std::move(weight)), bias_(std::move(bias)) {}
  // An F32 weight held in a tensor.
  Gate(RoutingConfig rc, Tensor weight, Tensor bias);
  const RoutingConfig& config() const { return rc_; }
  int64_t hidden() const { return weight_.cols; }
  const Weight& weight() const { return weight_; }
  // Bytes of the gate's weight and bias in memory.
  int64_t bytes() const {
    return weight_.bytes() +
           (bias_.empty() ? 0 : bias_.numel()) * static_cast<int64_t>(sizeof(float));
  }
  // hidden: [T, hidden]. Thread-safe.
  Routing Route(const float* hidden, int64_t t, ComputeBackend* backend) const;

 private:
  RoutingConfig rc_;
  Weight weight_;
  Tensor bias_;
};

}  // namespace moemesh
