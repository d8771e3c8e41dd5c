// LocalExpertGroup: holds the weights of a set of (layer, expert) FFNs and computes them.
//
// This is the compute of an expert worker and of the single-process engine. Run groups the
// tokens of a call by expert, so every expert does one batched GEMM chain per call (never one
// per token), then scatters the weighted outputs back. Weights stay in their checkpoint's
// dtype; each expert's products run on all of the process's kernel threads. Only the tensors of
// held experts are read from the checkpoint. With a device attached (AttachDevice: a GPU worker)
// a call runs there as a whole instead. Run is thread-safe (all scratch space is per call).
#pragma once

#include <atomic>
#include <memory>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/string_view.h"
#include "services/compute/backend.h"
#include "services/compute/device_experts.h"
#include "services/model/config.h"
#include "services/model/safetensors.h"
#include "services/moe/expert_group.h"

namespace moemesh {

// In the checkpoint's dtype (or Checkpoint::weights_dtype() when set), read from the mapping.
struct ExpertWeights {
  Weight w1;  // gate_proj: [inter, hidden]
  Weight w3;  // up_proj:   [inter, hidden]
  Weight w2;  // down_proj: [hidden, inter]
};

// Expert id used for a layer's shared experts (DeepSeek-V3), which every token visits with
// weight 1. Routed experts are 0 .. num_experts-1.
inline constexpr int32_t kSharedExpertId = -1;

class LocalExpertGroup final : public ExpertGroup {
 public:
  // Loads `experts` (routed ids, or kSharedExpertId) from `ckpt`. The backend must outlive this.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<LocalExpertGroup>> Load(
      const Checkpoint& ckpt, const ModelConfig& cfg, std::vector<ExpertKey> experts,
      ComputeBackend* backend, std::string name = "local");

  std::string name() const override { return name_; }
  void RunExpertsAsync(std::shared_ptr<const ExpertBatch> batch, const CallOptions& opts,
                       ExpertDone done) override;

  // Synchronous form. NOT_FOUND naming the (layer, expert) if one is not held.
  [[nodiscard]] absl::StatusOr<Tensor> Run(const ExpertBatch& batch) const;

  // Every held expert's weights, for uploading to a device.
  std::vector<DeviceExpertWeights> DeviceWeights() const;
  // From now on Run computes on `device`, which holds DeviceWeights() (MakeCudaExperts); the
  // backend is no longer used, and the group drops its host weights (a checkpoint's mapping is
  // unmapped once its Checkpoint is gone too), so a GPU worker's resident memory is not a second
  // copy of its group. Call before the group serves. Run answers INTERNAL when a call fails on
  // the device.
  void AttachDevice(std::unique_ptr<DeviceExperts> device);
  const DeviceExperts* device() const { return device_.get(); }

  bool Holds(ExpertKey key) const { return weights_.contains(key); }
  const std::vector<ExpertKey>& experts() const { return experts_; }
  int64_t hidden() const { return hidden_; }
  // Bytes of weights this group holds.
  int64_t weight_bytes() const { return weight_bytes_; }

  // What Run has computed since the group was loaded: one expert run per (call, expert with at
  // least one row), and the bytes of those experts' weights (each read once per run).
  struct RunCounters {
    int64_t expert_runs = 0;
    int64_t weight_bytes_read = 0;
  };
  RunCounters counters() const {
    return {expert_runs_.load(std::memory_order_relaxed),
            weight_bytes_read_.load(std::memory_order_relaxed)};
  }

 private:
  LocalExpertGroup() = default;
  // Run's work on device_ (the batch is validated and every expert is held).
  absl::StatusOr<Tensor> RunOnDevice(const ExpertBatch& b) const;
  std::string name_;
  ComputeBackend* backend_ = nullptr;
  int64_t hidden_ = 0;
  int num_experts_ = 0;
  int64_t weight_bytes_ = 0;
  std::vector<ExpertKey> experts_;
  absl::flat_hash_map<ExpertKey, ExpertWeights> weights_;
  std::unique_ptr<DeviceExperts> device_;                 // when set, Run computes there
  absl::flat_hash_map<ExpertKey, int64_t> expert_bytes_;  // each held expert's weight bytes
  mutable std::atomic<int64_t> expert_runs_{0};
  mutable std::atomic<int64_t> weight_bytes_read_{0};
};

// Parses "0-3,6,9-10" into sorted expert ids; INVALID_ARGUMENT on bad syntax.
[[nodiscard]] absl::StatusOr<std::vector<int>> ParseIdRanges(absl::string_view spec);

}  // namespace moemesh

namespace moemesh {

// Experts to hold from `--experts` ("0-3,7" in every MoE layer; "shared" adds the shared
// experts) or a placement file whose lines read "LAYER IDS" ("3 0-7,shared"; '#' comments).
[[nodiscard]] absl::StatusOr<std::vector<ExpertKey>> ExpertsFromSpec(const ModelConfig& cfg,
                                                                     absl::string_view spec);
[[nodiscard]] absl::StatusOr<std::vector<ExpertKey>> ExpertsFromPlacementFile(
    const ModelConfig& cfg, const std::string& path);

}  // namespace moemesh
