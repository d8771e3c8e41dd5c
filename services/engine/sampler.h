// Sampler: picks the next token from a row of logits.
//
// temperature 0 is greedy (argmax, lowest id on ties). Otherwise logits are divided by the
// temperature, restricted to the top_k largest (0: all) and then to the smallest set whose
// probability reaches top_p (1: all), and sampled with a generator seeded by `seed`, so the
// same request with the same seed gives the same tokens. Not thread-safe; one per request.
#pragma once

#include <cstdint>
#include <random>

#include "absl/status/status.h"
#include "absl/types/span.h"

namespace moemesh {

struct SamplingParams {
  float temperature = 0.0f;
  int top_k = 0;
  float top_p = 1.0f;
  uint64_t seed = 0;
};

[[nodiscard]] absl::Status ValidateSampling(const SamplingParams& p);

class Sampler {
 public:
  explicit Sampler(const SamplingParams& p) : p_(p), rng_(p.seed) {}
  int32_t Sample(absl::Span<const float> logits);

 private:
  SamplingParams p_;
  std::mt19937_64 rng_;
};

int32_t Argmax(absl::Span<const float> logits);

}  // namespace moemesh
