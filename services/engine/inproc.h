// InprocModel: the single-process engine, assembled.
//
// The mesh with its transports replaced by function calls: the same Gate and MoeDispatcher
// the router runs, over LocalExpertGroups that split the experts as G workers would. This is
// the yardstick the mesh is tested against.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "services/compute/backend.h"
#include "services/engine/engine.h"
#include "services/model/config.h"
#include "services/model/safetensors.h"
#include "services/moe/local_expert_group.h"
#include "services/moe/moe_layer.h"

namespace moemesh {

struct InprocOptions {
  int groups = 1;  // local expert groups the experts are split over
  int top_k = 0;   // overrides num_experts_per_tok when > 0
  // Converts the weights to this dtype on load; nullopt keeps the checkpoint's dtypes.
  std::optional<DType> weights_dtype;
};

// "" or "checkpoint" → nullopt (keep each weight's dtype); "f32", "bf16", "f16" → that dtype.
// INVALID_ARGUMENT otherwise (FP8 is read from FP8 checkpoints, never produced on load).
[[nodiscard]] absl::StatusOr<std::optional<DType>> ParseWeightsDType(absl::string_view flag);

// Applies overrides (top-k) to a loaded config; INVALID_ARGUMENT when out of range.
[[nodiscard]] absl::Status ApplyTopKOverride(int top_k, ModelConfig* cfg);

// The experts of group `g` of `groups` under the default placement: routed experts split
// evenly (contiguous ranges) in every MoE layer; shared experts go to group 0.
std::vector<ExpertKey> DefaultPlacement(const ModelConfig& cfg, int g, int groups);

// Opens a checkpoint with the config's FP8 block size, as every service must, converting weights
// to `weights_dtype` on load when set.
[[nodiscard]] absl::StatusOr<std::unique_ptr<Checkpoint>> OpenModelCheckpoint(
    const std::string& dir, const ModelConfig& cfg,
    std::optional<DType> weights_dtype = std::nullopt);

struct InprocModel {
  std::unique_ptr<Checkpoint> checkpoint;
  ModelConfig config;
  std::unique_ptr<ComputeBackend> backend;
  std::unique_ptr<MoeDispatcher> moe;
  std::unique_ptr<Engine> engine;
  int64_t expert_weight_bytes = 0;              // of every local expert group
  std::vector<const LocalExpertGroup*> groups;  // the local expert groups (in moe)

  // Bytes all the model's weights occupy in memory: the engine's dense weights, the routers'
  // gates and the experts.
  int64_t weight_bytes() const {
    return expert_weight_bytes + engine->weight_bytes() + moe->gate_bytes();
  }
  // Every local group's counters, summed.
  LocalExpertGroup::RunCounters expert_counters() const {
    LocalExpertGroup::RunCounters c;
    for (const LocalExpertGroup* g : groups) {
      const LocalExpertGroup::RunCounters gc = g->counters();
      c.expert_runs += gc.expert_runs;
      c.weight_bytes_read += gc.weight_bytes_read;
    }
    return c;
  }

  [[nodiscard]] static absl::StatusOr<std::unique_ptr<InprocModel>> Load(
      const std::string& dir, const InprocOptions& options = {});
};

}  // namespace moemesh
