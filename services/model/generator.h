// Random checkpoints in the Hugging Face layout, for tests and benchmarks.
//
// Weights are deterministic in (seed, tensor name), so the same options always give the same
// bytes. Scales keep activations O(1) through any depth, give distinct tokens clearly
// different logits, and give the router clear winners among experts. The directory gets
// config.json, model.safetensors (or shards with an index) and a byte-level tokenizer.json.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "services/model/config.h"
#include "services/tensor/tensor.h"

namespace moemesh {

struct GeneratorOptions {
  ModelConfig config;
  DType dtype = DType::kF32;
  uint64_t seed = 0;
  size_t shard_bytes = 0;  // 0: one file; otherwise shards of about this size
};

// A small Mixtral config for tests: vocab, hidden, inter, layers, heads, kv heads, experts.
ModelConfig SmallMixtralConfig(int vocab = 96, int hidden = 32, int inter = 48, int layers = 2,
                               int heads = 4, int kv_heads = 2, int experts = 8, int top_k = 2);

[[nodiscard]] absl::Status GenerateModel(const GeneratorOptions& options, const std::string& dir);

}  // namespace moemesh
