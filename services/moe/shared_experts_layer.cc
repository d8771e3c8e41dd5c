#include "services/moe/shared_experts_layer.h"

#include "services/common/status_macros.h"

namespace moemesh {

SharedExpertsLayer::SharedExpertsLayer(MoeLayer* routed, std::unique_ptr<LocalExpertGroup> shared)
    : routed_(routed), shared_(std::move(shared)), pool_(1, 1024) {}

absl::StatusOr<Tensor> SharedExpertsLayer::Forward(int layer, const Tensor& hidden,
                                                   const CallOptions& opts) {
  return ForwardAndWait(layer, hidden, opts);
}

namespace {

// The two halves of one call; the second to arrive adds them and calls `done`.
struct Join {
  absl::Mutex mu;
  int pending = 2;
  absl::StatusOr<Tensor> routed, shared;
  MoeDone done;

  void Arrive() {
    {
      absl::MutexLock lock(&mu);
      if (--pending > 0) return;
    }
    if (!routed.ok()) return done(routed.status());
    if (!shared.ok()) return done(WithContext(shared.status(), "shared experts"));
    Tensor out = *std::move(routed);
    float* o = out.mutable_data();
    const float* s = shared->data();
    for (int64_t i = 0; i < out.numel(); ++i) o[i] += s[i];
    done(std::move(out));
  }
};

}  // namespace

void SharedExpertsLayer::StartForward(int layer, Tensor hidden, const CallOptions& opts,
                                      MoeDone done) {
  const int64_t t = hidden.dim(0);
  auto batch = std::make_shared<ExpertBatch>();
  batch->layer = layer;
  batch->tokens = hidden;
  batch->offsets.resize(t + 1);
  for (int64_t i = 0; i <= t; ++i) batch->offsets[i] = static_cast<int32_t>(i);
  batch->assignments.assign(t, ExpertAssignment{kSharedExpertId, 1.0f});
  auto join = std::make_shared<Join>();
  join->done = std::move(done);
  auto run_shared = [this, batch, join] {
    absl::StatusOr<Tensor> r = shared_->Run(*batch);
    {
      absl::MutexLock lock(&join->mu);
      join->shared = std::move(r);
    }
    join->Arrive();
  };
  if (!pool_.TrySchedule(run_shared)) run_shared();
  routed_->StartForward(layer, std::move(hidden), opts, [join](absl::StatusOr<Tensor> r) {
    {
      absl::MutexLock lock(&join->mu);
      join->routed = std::move(r);
    }
    join->Arrive();
  });
}

}  // namespace moemesh
