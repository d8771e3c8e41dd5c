// TextGenerator: the gateway's generation path shared by its gRPC and HTTP APIs.
//
// A TextRequest is the request in the gateway's own terms: a text prompt, token ids or a chat,
// sampling settings (unset ones take the model's generation_config.json defaults), stop ids
// and strings. Start() hands the text work (tokenizing, rendering the chat template) to a small
// thread pool, never the caller's thread, then submits to the Scheduler that both APIs share,
// so their requests batch together under the same limits. Events stream back as TextEvents:
// the new ids with the text they make safe to show (valid UTF-8, special tokens skipped, stop
// strings cut out), then one final event. A stop string ends the request at once and frees its
// place in the batch.
//
// Thread-safety: Start may be called from any thread. `on_event` is called on a pool thread
// (for an error before submission) or on the scheduler's loop thread; it must not block, and
// it is called for the final event exactly once.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "nlohmann/json.hpp"
#include "services/common/thread_pool.h"
#include "services/engine/scheduler.h"
#include "services/metrics/metrics.h"
#include "services/text/text_model.h"

namespace moemesh::gateway {

struct TextRequest {
  enum class Input { kText, kIds, kChat };
  Input input = Input::kText;
  std::string prompt;               // kText
  std::vector<int32_t> prompt_ids;  // kIds
  nlohmann::ordered_json messages;  // kChat: array of {"role","content"}, members in order
  nlohmann::ordered_json tools;     // kChat: null or an array
  bool add_special_tokens = true;   // kText
  int max_tokens = 16;
  std::optional<float> temperature, top_p;
  std::optional<int> top_k;
  uint64_t seed = 0;
  std::vector<int32_t> stop_token_ids;
  std::vector<std::string> stop;
  bool ignore_eos = false;
  bool skip_special_tokens = true;
  // -1: no log-probabilities; k >= 0: each token's log-probability and the k most likely.
  int logprobs = -1;
  absl::Time deadline = absl::InfiniteFuture();
  std::shared_ptr<CancelFlag> cancel;  // set by the caller to leave the batch; may be null
  std::string api;                     // "grpc" or "http", for metrics
};

struct TextEvent {
  bool done = false;
  // Not done: one new token and the text it makes safe to show (possibly empty).
  int32_t token = -1;
  std::string text;
  float logprob = 0;                           // when asked
  std::vector<std::pair<int32_t, float>> top;  // when asked: most likely first
  // Done: how it ended. A non-OK status means the request failed (nothing more follows);
  // otherwise `text` holds the last of the text and finish_reason is "stop" or "length".
  std::string finish_reason;
  std::string matched_stop;
  absl::Status status;
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
  std::vector<int32_t> prompt_ids;  // on the first event only (for echo and usage)
};

using TextCallback = std::function<void(TextEvent)>;

class TextGenerator {
 public:
  TextGenerator(Scheduler* scheduler, std::shared_ptr<const TextModel> text, Metrics* metrics,
                int threads);

  // Queues the request. RESOURCE_EXHAUSTED when the text pool is full (nothing is called then);
  // otherwise every outcome, errors included, arrives through `on_event`.
  [[nodiscard]] absl::Status Start(TextRequest request, TextCallback on_event);

  // Runs `fn` on the text pool (tokenizing for the Tokenize APIs). False when it is full.
  bool RunText(std::function<void()> fn) { return pool_.TrySchedule(std::move(fn)); }

  const TextModel& text() const { return *text_; }
  const std::shared_ptr<const TextModel>& text_ptr() const { return text_; }

 private:
  void Submit(TextRequest r, TextCallback on_event);

  Scheduler* scheduler_;
  std::shared_ptr<const TextModel> text_;
  Metrics* metrics_;
  ThreadPool pool_;  // last: joined first, while what its closures use still exists
};

}  // namespace moemesh::gateway
