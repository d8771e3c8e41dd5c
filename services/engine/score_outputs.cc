#include "services/engine/score_outputs.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/strings/str_cat.h"

namespace moemesh {

absl::Status ValidateScoreOptions(const ScoreOptions& options, int64_t vocab) {
  if (options.top_k < 0 || options.top_k > vocab) {
    return absl::InvalidArgumentError(
        absl::StrCat("top_log_probs ", options.top_k, " is outside [0, ", vocab, "]"));
  }
  return absl::OkStatus();
}

absl::StatusOr<ScoreOutputs> ComputeScoreOutputs(Tensor logits, absl::Span<const int32_t> tokens,
                                                 const ScoreOptions& options) {
  if (logits.shape().size() != 2 || logits.dim(0) != static_cast<int64_t>(tokens.size())) {
    return absl::InvalidArgumentError(
        absl::StrCat("logits ", logits.ShapeString(), " for ", tokens.size(), " tokens"));
  }
  const int64_t n = logits.dim(0), v = logits.dim(1);
  if (auto s = ValidateScoreOptions(options, v); !s.ok()) return s;
  ScoreOutputs out;
  const bool need_lse = options.log_probs || options.top_k > 0 || options.token_log_probs;
  if (options.log_probs && !options.omit_logits) logits = logits.Clone();
  if (options.top_k > 0) {
    out.top_ids.resize(n);
    out.top_log_probs.resize(n);
  }
  std::vector<int32_t> order;
  for (int64_t r = 0; r < n && need_lse; ++r) {
    const float* row = logits.row(r);
    const float mx = *std::max_element(row, row + v);
    double sum = 0;
    for (int64_t i = 0; i < v; ++i) sum += std::exp(static_cast<double>(row[i]) - mx);
    const double lse = mx + std::log(sum);
    if (options.top_k > 0) {
      order.resize(v);
      std::iota(order.begin(), order.end(), 0);
      auto better = [row](int32_t a, int32_t b) {
        return row[a] > row[b] || (row[a] == row[b] && a < b);
      };
      std::partial_sort(order.begin(), order.begin() + options.top_k, order.end(), better);
      for (int k = 0; k < options.top_k; ++k) {
        out.top_ids[r].push_back(order[k]);
        out.top_log_probs[r].push_back(static_cast<float>(row[order[k]] - lse));
      }
    }
    if (options.token_log_probs && r + 1 < n) {
      const int32_t next = tokens[r + 1];
      if (next < 0 || next >= v) {
        return absl::InvalidArgumentError(
            absl::StrCat("token id ", next, " outside the vocabulary"));
      }
      out.token_log_probs.push_back(static_cast<float>(row[next] - lse));
    }
    if (options.log_probs && !options.omit_logits) {
      float* w = logits.mutable_row(r);
      for (int64_t i = 0; i < v; ++i) w[i] = static_cast<float>(w[i] - lse);
    }
  }
  if (!options.omit_logits) out.logits = std::move(logits);
  return out;
}

}  // namespace moemesh
