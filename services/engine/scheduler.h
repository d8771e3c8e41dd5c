// Scheduler: continuous batching of generation and scoring requests over one Engine.
//
// A single loop thread owns the engine. Each step carries one token of every decoding
// sequence plus prefill chunks of prompts up to `max_step_tokens`, so concurrent requests
// share each MoE call. The prefill budget is shared fairly among the prompts being prefilled
// (each gets an equal share in turn, short ones are served whole, the rest goes to the long
// ones, round robin), so a 100K-token prompt cannot hold back the first token of a short one.
//
// Memory and limits. Every running request holds KV cache blocks (services/engine/
// kv_cache.h). A request is admitted (first come, first served) only when the blocks its
// whole prompt needs, less what the prefix cache already holds, are free; the blocks for its
// prompt are taken at admission, so prefill never runs short. When a decoding sequence needs
// a block and none is free, the newest running request is preempted: its blocks are freed
// and it goes back to the head of the waiting queue, to be recomputed from its tokens (prompt
// and everything generated so far) when memory allows. It is neither failed nor killed, and
// since recomputation feeds the same tokens, greedy output is unchanged. RESOURCE_EXHAUSTED
// at Submit, never a longer queue: for a prompt longer than `max_prompt_tokens`, a score of
// more than `max_score_tokens`, a request whose prompt plus max_tokens can never fit in the
// whole cache, or when `max_waiting` requests already wait. Requests leave the batch when they
// finish, are cancelled, or pass their deadline, and their blocks are freed at the next step.
// Callbacks run on the loop thread and must not block.
//
// Thread-safety: Submit, Stop and stats may be called from any thread.
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
  int64_t preempted = 0;            // requests preempted before this step
  int64_t prefix_query_tokens = 0;  // prompt tokens looked up in the prefix cache since the last
  int64_t prefix_hit_tokens = 0;    // step, and of those, found cached
  KvCacheStats kv;                  // the pool after the step
};

struct SchedulerOptions {
  int64_t max_step_tokens = 256;  // prefill chunk budget per step (decode tokens always fit)
  int max_running = 64;           // sequences in the batch at once
  int max_waiting = 1024;         // waiting requests before RESOURCE_EXHAUSTED
  // Longest prompt accepted (0: the model's max_position_embeddings).
  int64_t max_prompt_tokens = 0;
  // Longest Score accepted: it holds [tokens, vocab] F32 logits until it ends.
  int64_t max_score_tokens = 4096;
  // A failed step is retried (it is idempotent: sequences advance only when a step succeeds).
  // A request fails only when its own deadline passes, it is cancelled, the error is not
  // transient (UNAVAILABLE, RESOURCE_EXHAUSTED, ABORTED, DEADLINE_EXCEEDED, CANCELLED), or it
  // has been in this many failed steps in a row. Retries back off from 20 ms to 1 s.
  int max_failed_steps = 4;
  // Called on the loop thread after every step; must not block. May be empty.
  // Also called with sequences == 0 (no step ran) when the batch empties because its last
  // requests were cancelled or expired, so that gauges of the batch go back to zero.
  std::function<void(const StepInfo&)> on_step = nullptr;
};

struct SchedulerStats {
  int64_t steps = 0;
  int64_t step_tokens = 0;
  int64_t max_batch_sequences = 0;  // most sequences seen in one step
  int64_t preemptions = 0;          // running requests sent back to wait for memory
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
  // Moves running requests from the queue into the batch while memory and max_running allow;
  // the ones that can never run are returned to be finished outside the lock.
  void AdmitLocked(std::vector<std::unique_ptr<Active>>* failed) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Gives every decoding sequence room for its next token, preempting the newest running
  // requests as needed. Returns how many were preempted.
  int64_t MakeRoomForDecode();
  void Preempt(Active* a);

  Engine* const engine_;
  const SchedulerOptions options_;
  mutable absl::Mutex mu_;
  std::deque<std::unique_ptr<Active>> queue_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  bool drain_ ABSL_GUARDED_BY(mu_) = false;
  SchedulerStats stats_ ABSL_GUARDED_BY(mu_);
  std::vector<std::unique_ptr<Active>> running_;  // loop thread only
  int64_t next_arrival_ ABSL_GUARDED_BY(mu_) = 0;
  size_t round_robin_ = 0;  // loop thread only
  KvCacheStats last_kv_;    // loop thread only
  std::thread thread_;
};

}  // namespace moemesh
