// The commands of the moemesh tool, callable without flags (main.cc fills the structs).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "services/engine/sampler.h"

namespace moemesh::cli {

struct Common {
  std::string model;    // in-process model directory
  std::string gateway;  // or a gateway address
  int top_k = 0;
  int groups = 1;
  double timeout_s = 0;
};

struct MakeModelArgs {
  std::string arch, out, dtype;
  int vocab, hidden, intermediate, layers, heads, kv_heads, experts, top_k, shard_mb, max_position;
  uint64_t seed;
};

struct GenerateArgs {
  std::string prompt;
  std::vector<int32_t> tokens;
  int max_tokens = 16;
  SamplingParams sampling;
};

struct UpArgs {
  int groups = 1;
  int replicas = 1;
  std::string wire_dtype = "f32";
  std::string program;  // argv[0], to find the service binaries beside it
};

absl::Status MakeModel(const MakeModelArgs& a);
absl::Status Generate(const Common& c, const GenerateArgs& a);
absl::Status Score(const Common& c, const std::vector<int32_t>& tokens, bool logprobs);
absl::Status Up(const Common& c, const UpArgs& a);

}  // namespace moemesh::cli
