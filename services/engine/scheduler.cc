#include "services/engine/scheduler.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

namespace moemesh {

struct Scheduler::Active {
  GenerationRequest req;
  GenerationCallback cb;
  std::unique_ptr<Sequence> seq;  // null while waiting (before admission or after preemption)
  std::unique_ptr<Sampler> sampler;
  // The prompt, then every generated token. The cache holds the first seq->length() of them;
  // the rest are fed next (all but one only after a preemption).
  std::vector<int32_t> tokens;
  int64_t arrival = 0;  // submission order: preemption takes the largest
  int64_t generated = 0;
  std::vector<float> score_rows;  // score_only: logits gathered over prefill chunks
  int failed_steps = 0;           // failed steps in a row that this request was in
  bool finished = false;

  int64_t fed() const { return seq ? seq->length() : 0; }
  int64_t pending() const { return static_cast<int64_t>(tokens.size()) - fed(); }
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
  const int64_t prompt = static_cast<int64_t>(request.prompt.size());
  if (prompt > cfg.max_position_embeddings) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the prompt has ", prompt, " tokens; the model allows ", cfg.max_position_embeddings));
  }
  if (!request.score_only && request.max_tokens < 1) {
    return absl::InvalidArgumentError("max_tokens must be at least 1");
  }
  if (auto s = ValidateSampling(request.sampling); !s.ok()) return s;
  if (request.logprobs > 20)
    return absl::InvalidArgumentError("at most 20 top log-probabilities per token");
  if (options_.max_prompt_tokens > 0 && prompt > options_.max_prompt_tokens) {
    return absl::ResourceExhaustedError(absl::StrCat("the prompt has ", prompt,
                                                     " tokens; this server takes at most ",
                                                     options_.max_prompt_tokens));
  }
  if (request.score_only && prompt > options_.max_score_tokens) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "scoring ", prompt, " tokens; this server scores at most ", options_.max_score_tokens));
  }
  // The most tokens the request ever holds in the cache: the prompt and every generated token
  // but the last (never fed), within the model's positions.
  const KvCache& kv = engine_->kv_cache();
  const int64_t most = request.score_only ? prompt
                                          : std::min<int64_t>(prompt + request.max_tokens - 1,
                                                              cfg.max_position_embeddings);
  if (kv.bounded() && kv.BlocksFor(most) > kv.total_blocks()) {
    return absl::ResourceExhaustedError(
        absl::StrCat("the request needs up to ", most, " tokens of KV cache (", kv.BlocksFor(most),
                     " blocks); the whole cache holds ", kv.total_blocks() * kv.block_tokens()));
  }
  auto a = std::make_unique<Active>();
  a->sampler = std::make_unique<Sampler>(request.sampling);
  a->req = std::move(request);
  a->tokens = a->req.prompt;
  a->cb = std::move(on_event);
  absl::MutexLock lock(&mu_);
  if (stopping_) return absl::UnavailableError("the server is shutting down");
  if (static_cast<int>(queue_.size()) >= options_.max_waiting) {
    return absl::ResourceExhaustedError(
        absl::StrCat("too many requests waiting (", options_.max_waiting, ")"));
  }
  a->arrival = next_arrival_++;
  queue_.push_back(std::move(a));
  stats_.queued = static_cast<int>(queue_.size());
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
  a.seq.reset();  // the blocks go back to the pool before anything else runs
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

void Scheduler::AdmitLocked(std::vector<std::unique_ptr<Active>>* failed) {
  KvCache& kv = engine_->kv_cache();
  // A little headroom keeps a fresh admission from being preempted by the next decode step.
  const int64_t watermark = kv.bounded() ? kv.total_blocks() / 100 : 0;
  while (!queue_.empty() && static_cast<int>(running_.size()) < options_.max_running) {
    Active* a = queue_.front().get();
    auto seq = engine_->NewSequence();
    // Scores need the logits of every position, so they compute every position.
    const int64_t hit = a->req.score_only ? 0 : engine_->AttachCachedPrefix(seq.get(), a->tokens);
    const int64_t need = kv.BlocksFor(static_cast<int64_t>(a->tokens.size())) - seq->blocks();
    const bool alone = running_.empty();
    if (!alone && kv.free_blocks() - need < watermark) break;  // first come, first served
    if (!engine_->Reserve(seq.get(), static_cast<int64_t>(a->tokens.size()))) {
      if (!alone) break;
      // Nothing else holds memory and it still does not fit: the pool could not grow.
      failed->push_back(std::move(queue_.front()));
      queue_.pop_front();
      continue;
    }
    if (!a->req.score_only) kv.CountPrefixLookup(static_cast<int64_t>(a->tokens.size()), hit);
    a->seq = std::move(seq);
    running_.push_back(std::move(queue_.front()));
    queue_.pop_front();
  }
}

void Scheduler::Preempt(Active* a) {
  a->seq.reset();
  a->score_rows.clear();
  std::unique_ptr<Active> owned;
  for (auto& up : running_) {
    if (up.get() == a) owned = std::move(up);
  }
  std::erase_if(running_, [](const auto& up) { return up == nullptr; });
  absl::MutexLock lock(&mu_);
  ++stats_.preemptions;
  // Back to the queue in arrival order, ahead of everything that came later.
  auto pos = std::find_if(queue_.begin(), queue_.end(),
                          [a](const auto& q) { return q->arrival > a->arrival; });
  queue_.insert(pos, std::move(owned));
}

int64_t Scheduler::MakeRoomForDecode() {
  int64_t preempted = 0;
  // Oldest first: they are the last to be preempted, so they are served first.
  std::vector<Active*> order;
  for (auto& up : running_) order.push_back(up.get());
  std::sort(order.begin(), order.end(),
            [](const Active* x, const Active* y) { return x->arrival < y->arrival; });
  for (Active* a : order) {
    if (a->seq == nullptr || a->finished) continue;  // preempted already
    const int64_t want = a->fed() + std::min<int64_t>(a->pending(), 1);
    while (!engine_->Reserve(a->seq.get(), std::max(want, a->seq->capacity()))) {
      Active* victim = nullptr;
      for (auto& up : running_) {
        if (up->seq != nullptr && (victim == nullptr || up->arrival > victim->arrival)) {
          victim = up.get();
        }
      }
      if (victim == a && running_.size() == 1) {
        // Alone and still no room: the pool could not grow (memory refused).
        Finish(*a, "error",
               absl::ResourceExhaustedError("the KV cache has no room left for this request"));
        break;
      }
      Preempt(victim);
      ++preempted;
      if (victim == a) break;
    }
  }
  std::erase_if(running_, [](const auto& up) { return up->finished; });
  return preempted;
}

void Scheduler::Loop() {
  const ModelConfig& cfg = engine_->config();
  int consecutive_failures = 0;  // failed steps in a row, for the retry backoff
  while (true) {
    std::vector<std::unique_ptr<Active>> dropped, failed;  // finished outside the lock
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
      // Waiting requests that were cancelled or expired leave now, not when admitted.
      const absl::Time now = absl::Now();
      for (auto& a : queue_) {
        if ((a->req.cancel && a->req.cancel->cancelled()) || now > a->req.deadline) {
          dropped.push_back(std::move(a));
        }
      }
      std::erase_if(queue_, [](const auto& a) { return a == nullptr; });
      AdmitLocked(&failed);
      stats_.queued = static_cast<int>(queue_.size());
      stats_.running = static_cast<int>(running_.size());
    }
    for (auto& a : failed) {
      Finish(*a, "error", absl::ResourceExhaustedError("the KV cache cannot hold this request"));
    }
    for (auto& a : dropped) {
      if (a->req.cancel && a->req.cancel->cancelled()) {
        Finish(*a, "cancelled", absl::CancelledError("cancelled by the client"));
      } else {
        Finish(*a, "deadline", absl::DeadlineExceededError("deadline exceeded"));
      }
    }

    // Drop cancelled and expired requests before they cost a step; their blocks are freed.
    const absl::Time now = absl::Now();
    for (auto& a : running_) {
      if (a->req.cancel && a->req.cancel->cancelled()) {
        Finish(*a, "cancelled", absl::CancelledError("cancelled by the client"));
      } else if (now > a->req.deadline) {
        Finish(*a, "deadline", absl::DeadlineExceededError("deadline exceeded"));
      }
    }
    const size_t before_drop = running_.size();
    std::erase_if(running_, [](const auto& a) { return a->finished; });
    const int64_t preempted = MakeRoomForDecode();
    if (running_.empty()) {
      // The batch emptied without a step (its last requests were cancelled or expired): tell
      // the observer, or gauges fed by steps would keep the old batch until the next request.
      if (before_drop > 0 && options_.on_step) {
        StepInfo idle;
        idle.sequences = 0;
        idle.running = 0;
        idle.preempted = preempted;
        {
          absl::MutexLock lock(&mu_);
          stats_.running = 0;
          idle.queued = stats_.queued;
        }
        idle.kv = engine_->kv_cache().stats();
        idle.prefix_query_tokens = idle.kv.prefix_query_tokens - last_kv_.prefix_query_tokens;
        idle.prefix_hit_tokens = idle.kv.prefix_hit_tokens - last_kv_.prefix_hit_tokens;
        last_kv_ = idle.kv;
        options_.on_step(idle);
      }
      continue;
    }

    // Build the step: one token of every decoding sequence first, then prefill chunks, the
    // budget split fairly among the prefilling requests starting at a rotating position.
    std::vector<StepInput> inputs;
    std::vector<Active*> owners;
    std::vector<int64_t> chunk;
    int64_t budget = options_.max_step_tokens;
    std::vector<Active*> prefilling;
    for (auto& up : running_) {
      Active* a = up.get();
      if (a->pending() == 1) {
        owners.push_back(a);
        chunk.push_back(1);
        --budget;
      } else if (a->pending() > 1) {
        prefilling.push_back(a);
      }
    }
    if (!prefilling.empty()) {
      if (owners.empty()) budget = std::max<int64_t>(budget, 1);
      const size_t n = prefilling.size();
      std::rotate(prefilling.begin(), prefilling.begin() + (round_robin_++ % n), prefilling.end());
      std::vector<int64_t> give(n, 0);
      // Water-filling: an equal share each round; requests that need less take what they
      // need and the rest is shared again among the others.
      while (budget > 0) {
        size_t hungry = 0;
        for (size_t i = 0; i < n; ++i) hungry += give[i] < prefilling[i]->pending();
        if (hungry == 0) break;
        const int64_t share = std::max<int64_t>(1, budget / static_cast<int64_t>(hungry));
        for (size_t i = 0; i < n && budget > 0; ++i) {
          const int64_t take = std::min({share, prefilling[i]->pending() - give[i], budget});
          give[i] += take;
          budget -= take;
        }
      }
      for (size_t i = 0; i < n; ++i) {
        if (give[i] == 0) continue;
        owners.push_back(prefilling[i]);
        chunk.push_back(give[i]);
      }
    }
    int64_t step_tokens = 0;
    // The step ends at the earliest deadline among its requests: a later one would let a
    // request run past its own. (A request whose deadline ends the step fails; the others
    // retry in the next step.)
    absl::Time deadline = absl::InfiniteFuture();
    for (size_t i = 0; i < owners.size(); ++i) {
      Active* a = owners[i];
      inputs.push_back({a->seq.get(),
                        absl::Span<const int32_t>(a->tokens.data() + a->fed(), chunk[i]),
                        a->req.score_only});
      deadline = std::min(deadline, a->req.deadline);
      step_tokens += chunk[i];
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
    info.preempted = preempted;
    for (auto& [flag, id] : watches) flag->RemoveCallback(id);
    {
      absl::MutexLock lock(&mu_);
      ++stats_.steps;
      stats_.step_tokens += step_tokens;
      stats_.max_batch_sequences = std::max<int64_t>(stats_.max_batch_sequences, owners.size());
      info.queued = static_cast<int>(queue_.size());
    }
    if (!out.ok()) {
      // Only what must fail fails: requests past their deadline, cancelled ones, and all of
      // them for an error that retrying cannot fix or after too many failed steps. The rest
      // stay in the batch and the step is retried after a backoff.
      const absl::StatusCode code = out.status().code();
      const bool transient =
          code == absl::StatusCode::kUnavailable || code == absl::StatusCode::kResourceExhausted ||
          code == absl::StatusCode::kAborted || code == absl::StatusCode::kDeadlineExceeded ||
          code == absl::StatusCode::kCancelled;
      const absl::Time now = absl::Now();
      bool kept = false;
      for (Active* a : owners) {
        if (a->req.cancel && a->req.cancel->cancelled()) {
          Finish(*a, "cancelled", absl::CancelledError("cancelled"));
        } else if (now >= a->req.deadline) {
          Finish(*a, "deadline",
                 absl::DeadlineExceededError(
                     absl::StrCat("deadline exceeded (last step: ", out.status().message(), ")")));
        } else if (!transient || ++a->failed_steps >= options_.max_failed_steps) {
          Finish(*a, "error", out.status());
        } else {
          kept = true;
        }
      }
      if (kept) {
        consecutive_failures = std::min(consecutive_failures + 1, 6);
        absl::SleepFor(
            std::min(absl::Milliseconds(20) * (1 << (consecutive_failures - 1)), absl::Seconds(1)));
      }
    } else {
      consecutive_failures = 0;
      for (Active* a : owners) a->failed_steps = 0;
      for (size_t i = 0; i < owners.size(); ++i) {
        Active* a = owners[i];
        const Tensor& logits = (*out)[i];
        const int64_t prompt_len = static_cast<int64_t>(a->req.prompt.size());
        if (a->req.score_only) {
          a->score_rows.insert(a->score_rows.end(), logits.data(), logits.data() + logits.numel());
          if (a->pending() == 0) Finish(*a, "stop", absl::OkStatus());
          continue;
        }
        if (a->pending() > 0) continue;  // prefill (or recomputation) not done yet
        const absl::Span<const float> row =
            logits.span().subspan((logits.dim(0) - 1) * cfg.vocab_size, cfg.vocab_size);
        const int32_t tok = a->sampler->Sample(row);
        ++a->generated;
        a->tokens.push_back(tok);
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
    }
    std::erase_if(running_, [](const auto& a) { return a->finished; });
    {
      absl::MutexLock lock(&mu_);
      stats_.running = static_cast<int>(running_.size());
    }
    info.running = static_cast<int>(running_.size());
    info.kv = engine_->kv_cache().stats();
    info.prefix_query_tokens = info.kv.prefix_query_tokens - last_kv_.prefix_query_tokens;
    info.prefix_hit_tokens = info.kv.prefix_hit_tokens - last_kv_.prefix_hit_tokens;
    last_kv_ = info.kv;
    if (options_.on_step) options_.on_step(info);
  }
}

}  // namespace moemesh
