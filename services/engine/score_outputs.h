// Score outputs: what a Score caller asked for, computed from the logits of every position.
//
//   ASSIGN_OR_RETURN(ScoreOutputs out, ComputeScoreOutputs(logits, tokens, options));
//
// Evaluation harnesses rarely want the whole [tokens, vocab] distribution: they want the
// log-probability of each given next token, or the top-k log-probabilities per position.
// Both are computed here, row by row, in double for the log-sum-exp. This is per-position
// work over the whole vocabulary, so the gateway runs it on a worker pool, never on the
// scheduler's thread. Pure functions; thread-safe.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "services/tensor/tensor.h"

namespace moemesh {

struct ScoreOptions {
  bool log_probs = false;        // the returned distribution is log-softmaxed
  int top_k = 0;                 // per position, the k most likely next tokens
  bool token_log_probs = false;  // log P(tokens[i + 1] | tokens[..i]) for i < n - 1
  bool omit_logits = false;      // return no [n, vocab] distribution
};

struct ScoreOutputs {
  Tensor logits;  // [n, vocab] f32 (log-probabilities when log_probs); empty when omitted
  // When top_k > 0, per position: ids and log-probabilities, most likely first, ties by id.
  std::vector<std::vector<int32_t>> top_ids;
  std::vector<std::vector<float>> top_log_probs;
  std::vector<float> token_log_probs;  // when token_log_probs: n - 1 values
};

// INVALID_ARGUMENT when top_k is negative or above the vocabulary.
[[nodiscard]] absl::Status ValidateScoreOptions(const ScoreOptions& options, int64_t vocab);

// logits: [n, vocab] f32, row i the distribution after tokens[i]; tokens: the n scored ids.
[[nodiscard]] absl::StatusOr<ScoreOutputs> ComputeScoreOutputs(Tensor logits,
                                                               absl::Span<const int32_t> tokens,
                                                               const ScoreOptions& options);

}  // namespace moemesh
