#include "services/moe/shared_experts_layer.h"

#include "absl/synchronization/notification.h"
#include "services/common/status_macros.h"

namespace moemesh {

SharedExpertsLayer::SharedExpertsLayer(MoeLayer* routed, std::unique_ptr<LocalExpertGroup> shared)
    : routed_(routed), shared_(std::move(shared)), pool_(1, 1024) {}

absl::StatusOr<Tensor> SharedExpertsLayer::Forward(int layer, const Tensor& hidden,
                                                   const CallOptions& opts) {
  const int64_t t = hidden.dim(0);
  ExpertBatch batch;
  batch.layer = layer;
  batch.tokens = hidden;
  batch.offsets.resize(t + 1);
  for (int64_t i = 0; i <= t; ++i) batch.offsets[i] = static_cast<int32_t>(i);
  batch.assignments.assign(t, ExpertAssignment{kSharedExpertId, 1.0f});
  absl::Notification done;
  absl::StatusOr<Tensor> shared_out;
  if (!pool_.TrySchedule([&] {
        shared_out = shared_->Run(batch);
        done.Notify();
      })) {
    shared_out = shared_->Run(batch);
    done.Notify();
  }
  absl::StatusOr<Tensor> routed_out = routed_->Forward(layer, hidden, opts);
  done.WaitForNotification();
  RETURN_IF_ERROR(routed_out.status());
  RETURN_IF_ERROR(shared_out.status(), "shared experts");
  Tensor out = *std::move(routed_out);
  float* o = out.mutable_data();
  const float* s = shared_out->data();
  for (int64_t i = 0; i < out.numel(); ++i) o[i] += s[i];
  return out;
}

}  // namespace moemesh
