#include "services/engine/scheduler.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace moemesh {

struct Scheduler::Active {
  GenerationRequest req;
  GenerationCallback cb;
  std::unique_ptr<Sequence> seq;
  std::unique_ptr<Sampler> sampler;
  int64_t prefilled = 0;    // prompt tokens already in the cache
  int32_t next_token = -1;  // sampled, not yet fed
  int64_t generated = 0;
  std::vector<float> score_rows;  // score_only: logits gathered over prefill chunks
  bool finished = false;
};

Scheduler::Scheduler(Engine* engine, SchedulerOptions options)
    : engine_(engine), options_(options), thread_([this] { Loop(); }) {}

Scheduler::~Scheduler() {
  Stop(false);
  if (thread_.joinable()) thread_.join();
}

absl::Status Scheduler::Submit(GenerationRequest request, GenerationCallback on_event) {
  const ModelConfig& cfg = engine_->config();
  if (request.prompt.empty()) return absl::InvalidArgumentError("the prompt has no tokens");
  for (int32_t t : request.prompt) {
    if (t < 0 || t >= cfg.vocab_size) {
      return absl::InvalidArgumentError(
          absl::StrCat("token id ", t, " is outside the vocabulary [0, ", cfg.vocab_size, ")"));
    }
  }
  if (static_cast<int64_t>(request.prompt.size()) > cfg.max_position_embeddings) {
    return absl::InvalidArgumentError(absl::StrCat("the prompt has ", request.prompt.size(),
                                                   " tokens; the model allows ",
                                                   cfg.max_position_embeddings));
  }
  if (!request.score_only && request.max_tokens < 1) {
    return absl::InvalidArgumentError("max_tokens must be at least 1");
  }
  if (auto s = ValidateSampling(request.sampling); !s.ok()) return s;
  if (request.logprobs > 20)
    return absl::InvalidArgumentError("at most 20 top log-probabilities per token");
  auto a = std::make_unique<Active>();
  a->sampler = std::make_unique<Sampler>(request.sampling);
  a->req = std::move(request);
  a->cb = std::move(on_event);
  absl::MutexLock lock(&mu_);
  if (stopping_) return absl::UnavailableError("the server is shutting down");
  if (static_cast<int>(queue_.size()) >= options_.max_queued) {
    return absl::ResourceExhaustedError(
        absl::StrCat("queue full (", options_.max_queued, " waiting)"));
  }
  queue_.push_back(std::move(a));
  return absl::OkStatus();
}

// The log-probability of `token` and the `top` most likely (lowest id first on ties).
static void TokenLogprobs(absl::Span<const float> row, int32_t token, int top,
                          GenerationEvent* ev) {
  float mx = row[0];
  for (float x : row) mx = std::max(mx, x);
  double sum = 0;
  for (float x : row) sum += std::exp(static_cast<double>(x - mx));
  const float lse = mx + static_cast<float>(std::log(sum));
  ev->logprob = row[token] - lse;
  const int k = std::min<int>(top, static_cast<int>(row.size()));
  if (k <= 0) return;
  std::vector<int32_t> idx(row.size());
  for (size_t i = 0; i < idx.size(); ++i) idx[i] = static_cast<int32_t>(i);
  std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), [&](int32_t a, int32_t b) {
    return row[a] > row[b] || (row[a] == row[b] && a < b);
  });
  for (int i = 0; i < k; ++i) ev->top_logprobs.emplace_back(idx[i], row[idx[i]] - lse);
}

void Scheduler::Stop(bool drain) {
  absl::MutexLock lock(&mu_);
  stopping_ = true;
  drain_ = drain;
}

SchedulerStats Scheduler::stats() const {
  absl::MutexLock lock(&mu_);
  SchedulerStats s = stats_;
  return s;
}

void Scheduler::Finish(Active& a, std::string reason, absl::Status status) {
  if (a.finished) return;
  a.finished = true;
  GenerationEvent ev;
  ev.done = true;
  ev.finish_reason = std::move(reason);
  ev.status = std::move(status);
  ev.prompt_tokens = static_cast<int64_t>(a.req.prompt.size());
  ev.completion_tokens = a.generated;
  if (a.req.score_only && ev.status.ok()) {
    ev.logits = Tensor::FromVector({ev.prompt_tokens, engine_->config().vocab_size},
                                   std::move(a.score_rows));
  }
  a.cb(ev);
}

void Scheduler::Loop() {
  const ModelConfig& cfg = engine_->config();
  while (true) {
    // Admit new requests; wait when there is nothing to do.
    {
      absl::MutexLock lock(&mu_);
      auto has_work = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return stopping_ || !queue_.empty() || !running_.empty();
      };
      mu_.Await(absl::Condition(&has_work));
      if (stopping_ && !drain_) {
        // Callbacks run after the lock is released: they may call back into the scheduler.
        std::vector<std::unique_ptr<Active>> abandoned = std::move(running_);
        running_.clear();
        for (auto& a : queue_) abandoned.push_back(std::move(a));
        queue_.clear();
        stats_.running = 0;
        stats_.queued = 0;
        mu_.Unlock();
        for (auto& a : abandoned)
          Finish(*a, "cancelled", absl::UnavailableError("the server is shutting down"));
        mu_.Lock();
        return;
      }
      if (stopping_ && queue_.empty() && running_.empty()) return;
      while (!queue_.empty() && static_cast<int>(running_.size()) < options_.max_running) {
        auto a = std::move(queue_.front());
        queue_.pop_front();
        a->seq = engine_->NewSequence();
        running_.push_back(std::move(a));
      }
      stats_.queued = static_cast<int>(queue_.size());
      stats_.running = static_cast<int>(running_.size());
    }

    // Drop cancelled and expired requests before they cost a step.
    const absl::Time now = absl::Now();
    for (auto& a : running_) {
      if (a->req.cancel && a->req.cancel->cancelled()) {
        Finish(*a, "cancelled", absl::CancelledError("cancelled by the client"));
      } else if (now > a->req.deadline) {
        Finish(*a, "deadline", absl::DeadlineExceededError("deadline exceeded"));
      }
    }
    std::erase_if(running_, [](const auto& a) { return a->finished; });
    if (running_.empty()) continue;

    // Build the step: decode tokens first, then prefill chunks within the budget.
    std::vector<StepInput> inputs;
    std::vector<Active*> owners;
    std::vector<int32_t> decode_tokens(running_.size());
    int64_t budget = options_.max_step_tokens;
    absl::Time deadline = absl::InfinitePast();
    for (size_t i = 0; i < running_.size(); ++i) {
      Active* a = running_[i].get();
      if (a->prefilled < static_cast<int64_t>(a->req.prompt.size())) continue;
      decode_tokens[i] = a->next_token;
      inputs.push_back({a->seq.get(), absl::Span<const int32_t>(&decode_tokens[i], 1), false});
      owners.push_back(a);
      --budget;
    }
    for (auto& up : running_) {
      Active* a = up.get();
      const int64_t remaining = static_cast<int64_t>(a->req.prompt.size()) - a->prefilled;
      if (remaining <= 0) continue;
      if (budget <= 0 && !inputs.empty()) break;
      const int64_t n = std::min(remaining, std::max<int64_t>(budget, 1));
      inputs.push_back({a->seq.get(),
                        absl::Span<const int32_t>(a->req.prompt.data() + a->prefilled, n),
                        a->req.score_only});
      owners.push_back(a);
      budget -= n;
    }
    int64_t step_tokens = 0;
    for (size_t i = 0; i < owners.size(); ++i) {
      deadline = std::max(deadline, owners[i]->req.deadline);
      step_tokens += static_cast<int64_t>(inputs[i].tokens.size());
    }
    CallOptions opts;
    opts.deadline = deadline;
    // When every request in the step has been cancelled, cancel the step itself, so the
    // cancellation reaches the router and the workers mid-step.
    opts.cancel = std::make_shared<CancelFlag>();
    auto cancelled_count = std::make_shared<std::atomic<size_t>>(0);
    std::vector<std::pair<CancelFlag*, int>> watches;
    if (std::all_of(owners.begin(), owners.end(),
                    [](Active* a) { return a->req.cancel != nullptr; })) {
      for (Active* a : owners) {
        watches.emplace_back(
            a->req.cancel.get(),
            a->req.cancel->OnCancel([cancelled_count, n = owners.size(), step = opts.cancel] {
              if (cancelled_count->fetch_add(1) + 1 == n) step->Cancel();
            }));
      }
    }
    const absl::Time step_start = absl::Now();
    absl::StatusOr<std::vector<Tensor>> out = engine_->Step(inputs, opts);
    StepInfo info;
    info.tokens = step_tokens;
    info.sequences = static_cast<int64_t>(owners.size());
    info.seconds = absl::ToDoubleSeconds(absl::Now() - step_start);
    info.ok = out.ok();
    for (auto& [flag, id] : watches) flag->RemoveCallback(id);
    {
      absl::MutexLock lock(&mu_);
      ++stats_.steps;
      stats_.step_tokens += step_tokens;
      stats_.max_batch_sequences = std::max<int64_t>(stats_.max_batch_sequences, owners.size());
      info.queued = static_cast<int>(queue_.size());
    }
    if (!out.ok()) {
      const bool expired = out.status().code() == absl::StatusCode::kDeadlineExceeded;
      const bool cancelled = out.status().code() == absl::StatusCode::kCancelled;
      for (Active* a : owners)
        Finish(*a, expired ? "deadline" : cancelled ? "cancelled" : "error", out.status());
      std::erase_if(running_, [](const auto& a) { return a->finished; });
      info.running = static_cast<int>(running_.size());
      if (options_.on_step) options_.on_step(info);
      continue;
    }
    for (size_t i = 0; i < owners.size(); ++i) {
      Active* a = owners[i];
      const Tensor& logits = (*out)[i];
      const int64_t prompt_len = static_cast<int64_t>(a->req.prompt.size());
      const bool was_prefill = a->prefilled < prompt_len;
      if (was_prefill) {
        a->prefilled += static_cast<int64_t>(inputs[i].tokens.size());
        if (a->req.score_only) {
          a->score_rows.insert(a->score_rows.end(), logits.data(), logits.data() + logits.numel());
          if (a->prefilled == prompt_len) Finish(*a, "stop", absl::OkStatus());
          continue;
        }
        if (a->prefilled < prompt_len) continue;
      }
      const absl::Span<const float> row =
          logits.span().subspan((logits.dim(0) - 1) * cfg.vocab_size, cfg.vocab_size);
      const int32_t tok = a->sampler->Sample(row);
      ++a->generated;
      a->next_token = tok;
      GenerationEvent ev;
      ev.token = tok;
      if (a->req.logprobs >= 0) TokenLogprobs(row, tok, a->req.logprobs, &ev);
      ev.prompt_tokens = prompt_len;
      ev.completion_tokens = a->generated;
      a->cb(ev);
      if (std::find(a->req.stop_tokens.begin(), a->req.stop_tokens.end(), tok) !=
          a->req.stop_tokens.end()) {
        Finish(*a, "stop", absl::OkStatus());
      } else if (a->generated >= a->req.max_tokens) {
        Finish(*a, "length", absl::OkStatus());
      } else if (a->seq->length() + 1 > cfg.max_position_embeddings) {
        Finish(*a, "max_position", absl::OkStatus());
      }
    }
    std::erase_if(running_, [](const auto& a) { return a->finished; });
    {
      absl::MutexLock lock(&mu_);
      stats_.running = static_cast<int>(running_.size());
    }
    info.running = static_cast<int>(running_.size());
    if (options_.on_step) options_.on_step(info);
  }
}

}  // namespace moemesh
