#include "gateway/text_generator.h"

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "services/common/status_macros.h"

namespace moemesh::gateway {
namespace {

absl::StatusOr<std::vector<int32_t>> PromptIds(const TextModel& text, const TextRequest& r) {
  switch (r.input) {
    case TextRequest::Input::kText:
      return text.Encode(r.prompt, r.add_special_tokens);
    case TextRequest::Input::kIds:
      return r.prompt_ids;
    case TextRequest::Input::kChat:
      return text.EncodeChat(r.messages, /*add_generation_prompt=*/true, r.tools);
  }
  return absl::InvalidArgumentError("unknown input");
}

// Per-request state of the scheduler callback, touched only on the scheduler's loop thread.
struct StreamState {
  std::optional<TextStream> text;
  bool finished = false;  // a stop string ended the request; later events are dropped
  bool first = true;
  std::vector<int32_t> prompt_ids;
};

}  // namespace

TextGenerator::TextGenerator(Scheduler* scheduler, std::shared_ptr<const TextModel> text,
                             Metrics* metrics, int threads)
    : scheduler_(scheduler),
      text_(std::move(text)),
      metrics_(metrics),
      pool_(threads, /*max_queue=*/256) {}

absl::Status TextGenerator::Start(TextRequest request, TextCallback on_event) {
  auto shared = std::make_shared<std::pair<TextRequest, TextCallback>>(std::move(request),
                                                                       std::move(on_event));
  if (!pool_.TrySchedule([this, shared]() mutable {
        Submit(std::move(shared->first), std::move(shared->second));
      })) {
    return absl::ResourceExhaustedError("the gateway's tokenizer queue is full; retry later");
  }
  return absl::OkStatus();
}

void TextGenerator::Submit(TextRequest r, TextCallback on_event) {
  auto fail = [&](absl::Status s) {
    TextEvent ev;
    ev.done = true;
    ev.status = std::move(s);
    on_event(std::move(ev));
  };
  if (r.stop.size() > 64) return fail(absl::InvalidArgumentError("at most 64 stop strings"));
  for (const std::string& s : r.stop) {
    if (s.size() > 1024)
      return fail(absl::InvalidArgumentError("a stop string is over 1024 bytes"));
  }
  if (r.logprobs > 20) return fail(absl::InvalidArgumentError("top_logprobs must be <= 20"));
  absl::StatusOr<std::vector<int32_t>> ids = PromptIds(*text_, r);
  if (!ids.ok()) return fail(ids.status());
  const TextModel& t = *text_;
  std::vector<std::string> stops;
  for (std::string& s : r.stop) {
    if (!s.empty()) stops.push_back(std::move(s));
  }
  if (!stops.empty() && t.tokenizer() == nullptr)
    return fail(absl::FailedPreconditionError("stop strings need the model's tokenizer.json"));

  GenerationRequest g;
  g.prompt = *ids;
  g.max_tokens = r.max_tokens;
  const GenerationConfig& d = t.generation();
  g.sampling.temperature = r.temperature.value_or(d.temperature.value_or(0.0f));
  g.sampling.top_k = r.top_k.value_or(d.top_k.value_or(0));
  g.sampling.top_p = r.top_p.value_or(d.top_p.value_or(1.0f));
  if (g.sampling.top_p == 0.0f) g.sampling.top_p = 1.0f;
  g.sampling.seed = r.seed;
  g.stop_tokens = r.stop_token_ids;
  if (!r.ignore_eos)
    g.stop_tokens.insert(g.stop_tokens.end(), t.eos_token_ids().begin(), t.eos_token_ids().end());
  g.logprobs = r.logprobs;
  g.deadline = r.deadline;
  g.cancel = r.cancel ? r.cancel : std::make_shared<CancelFlag>();

  auto state = std::make_shared<StreamState>();
  if (t.tokenizer() != nullptr)
    state->text.emplace(t.tokenizer(), std::move(stops), r.skip_special_tokens);
  state->prompt_ids = *ids;
  const absl::Time received = absl::Now();
  const int64_t prompt_tokens = static_cast<int64_t>(g.prompt.size());
  auto cancel = g.cancel;
  Metrics* metrics = metrics_;
  auto cb = [state, on_event, cancel, metrics, received, prompt_tokens](const GenerationEvent& ev) {
    if (state->finished) return;
    TextEvent out;
    out.prompt_tokens = ev.prompt_tokens;
    out.completion_tokens = ev.completion_tokens;
    if (state->first) {
      out.prompt_ids = std::move(state->prompt_ids);
      state->first = false;
    }
    if (!ev.done) {
      if (ev.completion_tokens == 1)
        metrics->ObserveTimeToFirstToken(absl::ToDoubleSeconds(absl::Now() - received));
      out.token = ev.token;
      out.logprob = ev.logprob;
      out.top = ev.top_logprobs;
      if (state->text) out.text = state->text->Push(ev.token);
      if (!state->text || !state->text->stopped()) {
        on_event(std::move(out));
        return;
      }
      // A stop string: the request ends here and leaves the batch at the next step.
      state->finished = true;
      cancel->Cancel();
      on_event(std::move(out));
      TextEvent end;
      end.done = true;
      end.finish_reason = "stop";
      end.matched_stop = state->text->matched_stop();
      end.prompt_tokens = ev.prompt_tokens;
      end.completion_tokens = ev.completion_tokens;
      metrics->AddTokens(prompt_tokens, ev.completion_tokens);
      metrics->ObserveLatency("Generate", absl::ToDoubleSeconds(absl::Now() - received));
      on_event(std::move(end));
      return;
    }
    metrics->AddTokens(prompt_tokens, ev.completion_tokens);
    metrics->ObserveLatency("Generate", absl::ToDoubleSeconds(absl::Now() - received));
    out.done = true;
    out.status = ev.status;
    if (ev.status.ok()) {
      if (state->text) out.text = state->text->Finish();
      // "max_position" is a length limit too, as OpenAI's API names it.
      out.finish_reason = ev.finish_reason == "stop" ? "stop" : ev.finish_reason;
    }
    on_event(std::move(out));
  };
  absl::Status s = scheduler_->Submit(std::move(g), std::move(cb));
  if (!s.ok()) fail(std::move(s));
}

}  // namespace moemesh::gateway
