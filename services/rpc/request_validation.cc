#include "services/rpc/request_validation.h"

#include <cmath>

#include "absl/strings/str_cat.h"

namespace moemesh {

absl::Status ValidateRunExpertsRequest(const v1::RunExpertsRequest& req, int64_t hidden,
                                       int num_experts, int max_per_token) {
  const v1::Tensor& t = req.tokens();
  if (t.shape_size() != 2 || t.shape(1) != hidden || t.shape(0) < 1) {
    return absl::InvalidArgumentError(absl::StrCat("tokens must be [n >= 1, ", hidden, "]"));
  }
  const int64_t n = t.shape(0);
  if (static_cast<int64_t>(req.offsets_size()) - 1 != n || req.offsets(0) != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "offsets must have ", n + 1, " entries starting at 0, got ", req.offsets_size()));
  }
  if (req.experts_size() != req.weights_size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "experts has ", req.experts_size(), " entries but weights has ", req.weights_size()));
  }
  if (req.offsets(n) != req.experts_size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "offsets end at ", req.offsets(n), " but there are ", req.experts_size(), " assignments"));
  }
  for (int64_t i = 0; i < n; ++i) {
    const int32_t lo = req.offsets(i), hi = req.offsets(i + 1);
    if (hi < lo) return absl::InvalidArgumentError(absl::StrCat("offsets decrease at token ", i));
    if (hi > req.experts_size()) {
      return absl::InvalidArgumentError(absl::StrCat("offsets of token ", i, " run past the ",
                                                     req.experts_size(), " assignments"));
    }
    if (hi - lo > max_per_token) {
      return absl::InvalidArgumentError(absl::StrCat("token ", i, " has ", hi - lo,
                                                     " expert assignments; at most ", max_per_token,
                                                     " are allowed"));
    }
    for (int32_t a = lo; a < hi; ++a) {
      const int32_t e = req.experts(a);
      if (e != -1 && (e < 0 || e >= num_experts)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "token ", i, ": no expert ", e, " (experts are 0..", num_experts - 1, ", -1 shared)"));
      }
      if (!std::isfinite(req.weights(a)))
        return absl::InvalidArgumentError(absl::StrCat("token ", i, ": weight is not finite"));
      for (int32_t b = lo; b < a; ++b) {
        if (req.experts(b) == e) {
          return absl::InvalidArgumentError(
              absl::StrCat("token ", i, " is assigned expert ", e, " twice"));
        }
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace moemesh
