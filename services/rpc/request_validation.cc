#include "services/rpc/request_validation.h"

#include <cmath>

#include "absl/strings/str_cat.h"

namespace moemesh {

absl::Status ValidateRunExpertsRequest(const v1::RunExpertsRequest& req, int64_t hidden,
                                       int num_experts, int max_per_token) {
  const v1::Tensor& t = req.tokens();
  return ValidateRunExperts(absl::MakeConstSpan(t.shape().data(), t.shape_size()),
                            absl::MakeConstSpan(req.offsets().data(), req.offsets_size()),
                            absl::MakeConstSpan(req.experts().data(), req.experts_size()),
                            absl::MakeConstSpan(req.weights().data(), req.weights_size()), hidden,
                            num_experts, max_per_token);
}

absl::Status ValidateRunExperts(absl::Span<const int64_t> shape, absl::Span<const int32_t> offsets,
                                absl::Span<const int32_t> experts, absl::Span<const float> weights,
                                int64_t hidden, int num_experts, int max_per_token) {
  if (shape.size() != 2 || shape[1] != hidden || shape[0] < 1) {
    return absl::InvalidArgumentError(absl::StrCat("tokens must be [n >= 1, ", hidden, "]"));
  }
  const int64_t n = shape[0];
  const int64_t num_assignments = static_cast<int64_t>(experts.size());
  if (static_cast<int64_t>(offsets.size()) - 1 != n || offsets[0] != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("offsets must have ", n + 1, " entries starting at 0, got ", offsets.size()));
  }
  if (experts.size() != weights.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("experts has ", experts.size(), " entries but weights has ", weights.size()));
  }
  if (offsets[n] != num_assignments) {
    return absl::InvalidArgumentError(absl::StrCat("offsets end at ", offsets[n], " but there are ",
                                                   num_assignments, " assignments"));
  }
  for (int64_t i = 0; i < n; ++i) {
    const int32_t lo = offsets[i], hi = offsets[i + 1];
    if (hi < lo) return absl::InvalidArgumentError(absl::StrCat("offsets decrease at token ", i));
    if (hi > num_assignments) {
      return absl::InvalidArgumentError(
          absl::StrCat("offsets of token ", i, " run past the ", num_assignments, " assignments"));
    }
    if (hi - lo > max_per_token) {
      return absl::InvalidArgumentError(absl::StrCat("token ", i, " has ", hi - lo,
                                                     " expert assignments; at most ", max_per_token,
                                                     " are allowed"));
    }
    for (int32_t a = lo; a < hi; ++a) {
      const int32_t e = experts[a];
      if (e != -1 && (e < 0 || e >= num_experts)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "token ", i, ": no expert ", e, " (experts are 0..", num_experts - 1, ", -1 shared)"));
      }
      if (!std::isfinite(weights[a]))
        return absl::InvalidArgumentError(absl::StrCat("token ", i, ": weight is not finite"));
      for (int32_t b = lo; b < a; ++b) {
        if (experts[b] == e) {
          return absl::InvalidArgumentError(
              absl::StrCat("token ", i, " is assigned expert ", e, " twice"));
        }
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace moemesh
