// Scheduler: continuous batching of generation and scoring requests over one Engine.
//
// A single loop thread owns the engine. Each step carries one token of every decoding
// sequence plus prefill chunks of new prompts up to `max_step_tokens`, so concurrent
// requests share each MoE call, and a long prompt is prefilled over several steps without
// stalling the others. Requests leave the batch when they finish, are cancelled, or pass
// their deadline. Callbacks run on the loop thread and must not block.
//
// Thread-safety: Submit and Stop may be called from any thread.
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "services/engine/engine.h"
#include "services/engine/sampler.h"

namespace moemesh {

struct GenerationRequest {
  std::vector<int32_t> prompt;
  int max_tokens = 16;
  SamplingParams sampling;
  std::vector<int32_t> stop_tokens;
  bool score_only = false;  // return the logits of every prompt position, generate nothing
  // -1: none; k >= 0: each generated token's log-probability under the model (the raw logits'
  // log-softmax, before temperature) and the k (<= 20) most likely tokens with theirs.
  int logprobs = -1;
  absl::Time deadline = absl::InfiniteFuture();
  std::shared_ptr<CancelFlag> cancel;  // may be null
};

struct GenerationEvent {
  bool done = false;  // false: `token` is a new token; true: the request ended
  int32_t token = -1;
  float logprob = 0;                                    // when the request asked
  std::vector<std::pair<int32_t, float>> top_logprobs;  // when asked; most likely first
  Tensor logits;              // score_only: [prompt, vocab] on the final event
  std::string finish_reason;  // "length", "stop", "max_position", "cancelled", "deadline", "error"
  absl::Status status;        // non-OK with finish_reason "error" / "deadline" / "cancelled"
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
};

using GenerationCallback = std::function<void(const GenerationEvent&)>;

// What one engine step did, for metrics.
struct StepInfo {
  int64_t tokens = 0;     // tokens in the step (decode tokens + prefill chunks)
  int64_t sequences = 0;  // sequences in the step
  int running = 0;        // sequences in the batch after the step
  int queued = 0;         // requests waiting to join
  double seconds = 0;     // wall time of Engine::Step
  bool ok = true;
};

struct SchedulerOptions {
  int64_t max_step_tokens = 256;  // prefill chunk budget per step (decode tokens always fit)
  int max_running = 64;           // sequences in the batch at once
  int max_queued = 1024;          // waiting requests before RESOURCE_EXHAUSTED
  // Called on the loop thread after every step; must not block. May be empty.
  std::function<void(const StepInfo&)> on_step = nullptr;
};

struct SchedulerStats {
  int64_t steps = 0;
  int64_t step_tokens = 0;
  int64_t max_batch_sequences = 0;  // most sequences seen in one step
  int running = 0;
  int queued = 0;
};

class Scheduler {
 public:
  Scheduler(Engine* engine, SchedulerOptions options);
  ~Scheduler();  // Stop()s and joins

  // Queues a request. INVALID_ARGUMENT for an empty prompt, bad tokens or sampling;
  // RESOURCE_EXHAUSTED when the queue is full; UNAVAILABLE after Stop.
  [[nodiscard]] absl::Status Submit(GenerationRequest request, GenerationCallback on_event);
  // Stops accepting; with `drain`, finishes what is queued and running first.
  void Stop(bool drain = false);
  SchedulerStats stats() const;

 private:
  struct Active;
  void Loop();
  void Finish(Active& a, std::string reason, absl::Status status);

  Engine* const engine_;
  const SchedulerOptions options_;
  mutable absl::Mutex mu_;
  std::deque<std::unique_ptr<Active>> queue_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  bool drain_ ABSL_GUARDED_BY(mu_) = false;
  SchedulerStats stats_ ABSL_GUARDED_BY(mu_);
  std::vector<std::unique_ptr<Active>> running_;  // loop thread only
  std::thread thread_;
};

}  // namespace moemesh
