// ExpertGroup: one group of (layer, expert) FFNs that the router dispatches tokens to.
//
// The same interface is implemented in process (LocalExpertGroup, which computes) and across
// the network (a gRPC client of an expert worker, in services/rpc), so the gating, dispatch
// and combining code in MoeDispatcher runs unchanged in both. RunExpertsAsync must be
// callable from any thread and must call `done` exactly once, possibly inline.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "services/tensor/tensor.h"

namespace moemesh {

struct ExpertKey {
  int layer = 0;
  int expert = 0;
  friend bool operator==(const ExpertKey& a, const ExpertKey& b) {
    return a.layer == b.layer && a.expert == b.expert;
  }
  friend bool operator<(const ExpertKey& a, const ExpertKey& b) {
    return a.layer != b.layer ? a.layer < b.layer : a.expert < b.expert;
  }
  template <typename H>
  friend H AbslHashValue(H h, const ExpertKey& k) {
    return H::combine(std::move(h), k.layer, k.expert);
  }
};

struct ExpertAssignment {
  int32_t expert = 0;
  float weight = 0.0f;
};

// A batch of tokens for one group at one layer. Token i goes to the experts
// assignments[offsets[i] .. offsets[i+1]); the result row i is Σ weight · expert(token i).
// The tokens are `tokens`' rows in order, or, when `rows` is set, the rows it names: the
// dispatcher shares the whole step's activations with every group instead of copying each
// group's subset, and a remote group gathers them straight into its outgoing message.
struct ExpertBatch {
  int layer = 0;
  Tensor tokens;                 // [T, hidden] f32
  std::vector<int32_t> rows;     // empty: token i is tokens.row(i); else tokens.row(rows[i])
  std::vector<int32_t> offsets;  // n + 1 entries, offsets[0] = 0, non-decreasing
  std::vector<ExpertAssignment> assignments;
  int64_t num_tokens() const {
    if (!rows.empty()) return static_cast<int64_t>(rows.size());
    return tokens.empty() ? 0 : tokens.dim(0);
  }
  const float* token(int64_t i) const { return tokens.row(rows.empty() ? i : rows[i]); }
};

// Cancellation shared by everything a request started. Callbacks registered with OnCancel
// run once, on the thread that calls Cancel (or inline if already cancelled); they must be
// quick (e.g. grpc::ClientContext::TryCancel). Thread-safe.
class CancelFlag {
 public:
  void Cancel();
  bool cancelled() const { return cancelled_.load(std::memory_order_acquire); }
  // Returns an id for RemoveCallback.
  int OnCancel(std::function<void()> fn);
  void RemoveCallback(int id);

 private:
  std::atomic<bool> cancelled_{false};
  absl::Mutex mu_;
  int next_id_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<std::pair<int, std::function<void()>>> callbacks_ ABSL_GUARDED_BY(mu_);
  // Set while Cancel runs the callbacks; RemoveCallback from another thread waits for it, so
  // that a callback never runs after its owner removed it.
  bool running_ ABSL_GUARDED_BY(mu_) = false;
  std::thread::id runner_ ABSL_GUARDED_BY(mu_);
};

struct CallOptions {
  absl::Time deadline = absl::InfiniteFuture();
  std::shared_ptr<CancelFlag> cancel;  // may be null
};

using ExpertDone = std::function<void(absl::StatusOr<Tensor>)>;

class ExpertGroup {
 public:
  virtual ~ExpertGroup() = default;
  virtual std::string name() const = 0;
  // Returns [n, hidden] through `done`: per token, the weighted sum of its experts' outputs.
  virtual void RunExpertsAsync(std::shared_ptr<const ExpertBatch> batch, const CallOptions& opts,
                               ExpertDone done) = 0;
};

// Checks the internal consistency of a batch: offsets and tensor shapes. Does not check that
// the experts are held. INVALID_ARGUMENT on any mismatch.
[[nodiscard]] absl::Status ValidateExpertBatch(const ExpertBatch& batch, int64_t hidden,
                                               int num_experts);

}  // namespace moemesh
