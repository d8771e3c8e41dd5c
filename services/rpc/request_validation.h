// Validators for RPC requests whose sizes drive allocation, run before anything is allocated.
//
// Each takes the parsed message and the limits of the serving process and returns OK or
// INVALID_ARGUMENT naming the first problem; none allocates more than O(1) beyond its input,
// so a hostile request costs its own parse and nothing else. Pure functions; thread-safe.
// Fuzzed by tests/fuzz (fuzz_requests).
#pragma once

#include <cstdint>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "moemesh/v1/expert_worker.pb.h"

namespace moemesh {

// A RunExperts request: `tokens` declares [n >= 1, hidden]; offsets has n + 1 non-decreasing
// entries from 0 to len(experts) == len(weights); each token has at most `max_per_token`
// assignments (routed top-k plus the shared-experts entry), none of them twice; expert ids
// are in [0, num_experts) or -1 (shared); weights are finite. The tensor's bytes are checked
// later, by TensorFromProto.
[[nodiscard]] absl::Status ValidateRunExpertsRequest(const v1::RunExpertsRequest& req,
                                                     int64_t hidden, int num_experts,
                                                     int max_per_token);
// The same over the request's fields as plain arrays (a request parsed by wire_codec.h).
[[nodiscard]] absl::Status ValidateRunExperts(absl::Span<const int64_t> token_shape,
                                              absl::Span<const int32_t> offsets,
                                              absl::Span<const int32_t> experts,
                                              absl::Span<const float> weights, int64_t hidden,
                                              int num_experts, int max_per_token);

}  // namespace moemesh
