// MoeLayer: what the engine calls for the MoE block of a layer.
//
// Forward takes the post-attention-normalised hidden states of every token in the step and
// returns the MoE output to add to the residual stream. In process it is a MoeDispatcher over
// local expert groups; in the gateway it is a gRPC client of the router service, whose own
// MoeDispatcher fans out to expert workers. The engine cannot tell them apart.
#pragma once

#include <functional>
#include <memory>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "services/compute/backend.h"
#include "services/model/config.h"
#include "services/model/safetensors.h"
#include "services/moe/expert_group.h"
#include "services/moe/gating.h"

namespace moemesh {

// Receives the result of MoeLayer::StartForward: [T, hidden_size] f32, or why there is none.
using MoeDone = std::function<void(absl::StatusOr<Tensor>)>;

class MoeLayer {
 public:
  virtual ~MoeLayer() = default;
  // hidden: [T, hidden_size] f32 → [T, hidden_size]. Blocks until the result is there.
  // Thread-safe.
  [[nodiscard]] virtual absl::StatusOr<Tensor> Forward(int layer, const Tensor& hidden,
                                                       const CallOptions& opts) = 0;
  // The asynchronous form, which lets the engine compute while an MoE call is in flight (two
  // micro-batches): `done` runs exactly once, inline or on another thread, and must not
  // block. `hidden` shares its storage with the caller's tensor, which must not be written
  // until `done` runs. Several calls may be in flight at once; none waits for another. The
  // default runs Forward inline (a local layer has nothing to overlap). Thread-safe.
  virtual void StartForward(int layer, Tensor hidden, const CallOptions& opts, MoeDone done) {
    done(Forward(layer, hidden, opts));
  }

 protected:
  // Forward for layers whose real work is StartForward: starts it and waits for `done`.
  absl::StatusOr<Tensor> ForwardAndWait(int layer, const Tensor& hidden, const CallOptions& opts);
};

// Per-call statistics a dispatcher reports (for metrics and tests).
struct DispatchStats {
  int64_t tokens = 0;
  int64_t token_sends = 0;  // (token, group) pairs sent; each token at most once per group
  std::vector<int64_t> expert_tokens;  // tokens routed to each expert
};

// Gating + dispatch plan + parallel fan-out + weighted combine: the router's core.
//
// Every token is sent at most once to each group, with all of its experts that group holds.
// When an expert lives in several groups (redundant experts), a token goes to a group it
// already visits if possible, otherwise to the candidate with the fewest tokens so far in this
// plan. Groups are called in parallel through RunExpertsAsync; the combine happens when the
// last one answers. Thread-safe; the groups and backend must outlive it.
class MoeDispatcher final : public MoeLayer {
 public:
  struct GroupEntry {
    std::shared_ptr<ExpertGroup> group;
    std::vector<ExpertKey> holds;  // what this group serves (kSharedExpertId for shared)
  };

  // Fails with FAILED_PRECONDITION naming every (layer, expert) no group holds. With
  // `dispatch_shared` false, shared experts are left to the caller (the gateway runs them,
  // see SharedExpertsLayer) and no group needs to hold them.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<MoeDispatcher>> Create(
      const ModelConfig& cfg, absl::flat_hash_map<int, Gate> gates, std::vector<GroupEntry> groups,
      ComputeBackend* backend, bool dispatch_shared = true);

  // Loads every MoE layer's gate (and score-correction bias) from a checkpoint.
  [[nodiscard]] static absl::StatusOr<absl::flat_hash_map<int, Gate>> LoadGates(
      const Checkpoint& ckpt, const ModelConfig& cfg);

  absl::StatusOr<Tensor> Forward(int layer, const Tensor& hidden, const CallOptions& opts) override;
  // Bytes of the routers' gate weights (and biases) this dispatcher holds.
  int64_t gate_bytes() const {
    int64_t b = 0;
    for (const auto& [layer, gate] : gates_) b += gate.bytes();
    return b;
  }
  // Runs ForwardAsync: in process (local groups) `done` runs before this returns.
  void StartForward(int layer, Tensor hidden, const CallOptions& opts, MoeDone done) override;
  // Asynchronous form: `done` runs once, on the thread of the last group to answer (or inline).
  void ForwardAsync(int layer, Tensor hidden, const CallOptions& opts,
                    std::function<void(absl::StatusOr<Tensor>, const DispatchStats&)> done);

  const ModelConfig& config() const { return cfg_; }
  bool dispatches_shared() const { return dispatch_shared_; }

 private:
  MoeDispatcher() = default;
  ModelConfig cfg_;
  ComputeBackend* backend_ = nullptr;
  bool dispatch_shared_ = true;
  absl::flat_hash_map<int, Gate> gates_;
  std::vector<GroupEntry> groups_;
  // (layer, expert) → indices into groups_ of the groups holding it.
  absl::flat_hash_map<ExpertKey, std::vector<int>> holders_;
};

}  // namespace moemesh
