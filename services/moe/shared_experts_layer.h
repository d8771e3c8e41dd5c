// SharedExpertsLayer: runs a layer's shared experts (DeepSeek-V3) next to another MoeLayer.
//
// In the gateway, the routed experts go to the router while the shared expert FFN runs here,
// on a helper thread, during the router round trip; the two outputs are added. This is the
// "shared experts in the gateway" placement; the alternative sends every token to a worker
// group holding them (MoeDispatcher with dispatch_shared). docs/BENCHMARKS.md compares them.
// Thread-safe. The shared FFNs of calls in flight together (two micro-batches) run one after
// the other on the helper thread; their routed calls do not wait for each other.
#pragma once

#include <memory>

#include "services/common/thread_pool.h"
#include "services/moe/local_expert_group.h"
#include "services/moe/moe_layer.h"

namespace moemesh {

class SharedExpertsLayer final : public MoeLayer {
 public:
  // `routed` must not dispatch shared experts itself; `shared` holds (layer, kSharedExpertId)
  // for every MoE layer. Both must outlive this.
  SharedExpertsLayer(MoeLayer* routed, std::unique_ptr<LocalExpertGroup> shared);
  absl::StatusOr<Tensor> Forward(int layer, const Tensor& hidden, const CallOptions& opts) override;
  // Starts the routed call and queues the shared FFN on the helper thread; `done` runs on
  // whichever finishes last. The sum is routed + shared whatever the order they finish in.
  void StartForward(int layer, Tensor hidden, const CallOptions& opts, MoeDone done) override;

 private:
  MoeLayer* routed_;
  std::unique_ptr<LocalExpertGroup> shared_;
  ThreadPool pool_;
};

}  // namespace moemesh
