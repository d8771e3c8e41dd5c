#include "gateway/gateway_service.h"

#include <cmath>
#include <deque>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "services/engine/score_outputs.h"
#include "services/rpc/service_main.h"
#include "services/rpc/tensor_proto.h"

namespace moemesh::gateway {
namespace {

v1::FinishReason ToProtoReason(const std::string& r) {
  if (r == "length") return v1::FINISH_REASON_LENGTH;
  if (r == "stop") return v1::FINISH_REASON_STOP;
  if (r == "max_position") return v1::FINISH_REASON_MAX_POSITION;
  return v1::FINISH_REASON_UNSPECIFIED;
}

// Streams one generation. Messages are queued by the scheduler thread and written one at a
// time; the reactor deletes itself in OnDone. The scheduler reaches it through a Link whose
// pointer OnDone clears, so a late event after the call ended is dropped safely.
class GenerateReactor final : public grpc::ServerWriteReactor<v1::GenerateResponse> {
 public:
  struct Link {
    absl::Mutex mu;
    GenerateReactor* reactor ABSL_GUARDED_BY(mu) = nullptr;
  };

  GenerateReactor(Metrics* metrics)
      : metrics_(metrics),
        link_(std::make_shared<Link>()),
        cancel_(std::make_shared<CancelFlag>()) {
    absl::MutexLock lock(&link_->mu);
    link_->reactor = this;
  }

  std::shared_ptr<Link> link() const { return link_; }
  std::shared_ptr<CancelFlag> cancel() const { return cancel_; }

  // Queues a message; `last` ends the stream with `status` after it (msg may be null).
  void Push(std::unique_ptr<v1::GenerateResponse> msg, bool last, grpc::Status status) {
    absl::MutexLock lock(&mu_);
    if (finishing_) return;
    if (msg) queue_.push_back(std::move(msg));
    if (last) {
      end_ = true;
      final_ = std::move(status);
    }
    MaybeWriteLocked();
  }

  void OnWriteDone(bool ok) override {
    absl::MutexLock lock(&mu_);
    writing_ = false;
    current_.reset();
    if (!ok) {
      // The client went away; nothing more can be written.
      queue_.clear();
      end_ = true;
      final_ = grpc::Status(grpc::StatusCode::CANCELLED, "stream closed by the client");
      cancel_->Cancel();
    }
    MaybeWriteLocked();
  }

  void OnCancel() override {
    cancel_->Cancel();
    absl::MutexLock lock(&mu_);
    queue_.clear();
    end_ = true;
    final_ = grpc::Status(grpc::StatusCode::CANCELLED, "cancelled");
    MaybeWriteLocked();
  }

  void OnDone() override {
    {
      absl::MutexLock lock(&link_->mu);
      link_->reactor = nullptr;
    }
    delete this;
  }

 private:
  void MaybeWriteLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (writing_ || finishing_) return;
    if (!queue_.empty()) {
      current_ = std::move(queue_.front());
      queue_.pop_front();
      writing_ = true;
      StartWrite(current_.get());
      return;
    }
    if (end_) {
      finishing_ = true;
      metrics_->CountRequest("Generate", static_cast<absl::StatusCode>(final_.error_code()));
      Finish(final_);
    }
  }

  Metrics* metrics_;
  std::shared_ptr<Link> link_;
  std::shared_ptr<CancelFlag> cancel_;
  absl::Mutex mu_;
  std::deque<std::unique_ptr<v1::GenerateResponse>> queue_ ABSL_GUARDED_BY(mu_);
  std::unique_ptr<v1::GenerateResponse> current_ ABSL_GUARDED_BY(mu_);
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool end_ ABSL_GUARDED_BY(mu_) = false;
  bool finishing_ ABSL_GUARDED_BY(mu_) = false;
  grpc::Status final_ ABSL_GUARDED_BY(mu_);
};

}  // namespace

GatewayService::GatewayService(Scheduler* scheduler, const ModelConfig& config,
                               std::optional<Tokenizer> tokenizer, Metrics* metrics)
    : scheduler_(scheduler),
      config_(config),
      tokenizer_(std::move(tokenizer)),
      metrics_(metrics),
      score_pool_(std::make_shared<ThreadPool>(2, 256)) {}

GatewayService::~GatewayService() = default;

grpc::ServerWriteReactor<v1::GenerateResponse>* GatewayService::Generate(
    grpc::CallbackServerContext* ctx, const v1::GenerateRequest* req) {
  auto* reactor = new GenerateReactor(metrics_);
  auto fail = [&](const absl::Status& s) {
    reactor->Push(nullptr, true, ToGrpcStatus(s));
    return reactor;
  };
  GenerationRequest g;
  switch (req->input_case()) {
    case v1::GenerateRequest::kPrompt: {
      if (!tokenizer_)
        return fail(
            absl::FailedPreconditionError("the model has no tokenizer; send prompt_tokens"));
      auto ids = tokenizer_->Encode(req->prompt());
      if (!ids.ok()) return fail(ids.status());
      g.prompt = *std::move(ids);
      break;
    }
    case v1::GenerateRequest::kPromptTokens:
      g.prompt.assign(req->prompt_tokens().ids().begin(), req->prompt_tokens().ids().end());
      break;
    default:
      return fail(absl::InvalidArgumentError("give prompt or prompt_tokens"));
  }
  g.max_tokens = req->max_tokens();
  g.sampling.temperature = req->sampling().temperature();
  g.sampling.top_k = req->sampling().top_k();
  g.sampling.top_p = req->sampling().top_p() == 0.0f ? 1.0f : req->sampling().top_p();
  g.sampling.seed = req->sampling().seed();
  g.stop_tokens.assign(req->stop_token_ids().begin(), req->stop_token_ids().end());
  g.deadline = absl::FromChrono(ctx->deadline());
  g.cancel = reactor->cancel();
  const absl::Time received = absl::Now();
  const int64_t prompt_tokens = static_cast<int64_t>(g.prompt.size());
  absl::Status s = scheduler_->Submit(
      std::move(g), [link = reactor->link(), tok = tokenizer_ ? &*tokenizer_ : nullptr,
                     utf8 = std::make_shared<Utf8Stream>(), metrics = metrics_, received,
                     prompt_tokens](const GenerationEvent& ev) {
        auto msg = std::make_unique<v1::GenerateResponse>();
        if (!ev.done) {
          if (ev.completion_tokens == 1) {
            metrics->ObserveTimeToFirstToken(absl::ToDoubleSeconds(absl::Now() - received));
          }
          msg->add_token_ids(ev.token);
          // A token may end inside a multi-byte character: text carries only whole ones.
          if (tok != nullptr) msg->set_text(utf8->Push(tok->DecodeOne(ev.token)));
        } else {
          metrics->AddTokens(prompt_tokens, ev.completion_tokens);
          if (tok != nullptr) msg->set_text(utf8->Flush());
          msg->set_finish_reason(ToProtoReason(ev.finish_reason));
          metrics->ObserveLatency("Generate", absl::ToDoubleSeconds(absl::Now() - received));
        }
        msg->mutable_usage()->set_prompt_tokens(ev.prompt_tokens);
        msg->mutable_usage()->set_completion_tokens(ev.completion_tokens);
        absl::MutexLock lock(&link->mu);
        if (link->reactor == nullptr) return;
        if (ev.done && !ev.status.ok()) {
          link->reactor->Push(nullptr, true, ToGrpcStatus(ev.status));
        } else {
          link->reactor->Push(std::move(msg), ev.done, grpc::Status::OK);
        }
      });
  if (!s.ok()) return fail(s);
  return reactor;
}

grpc::ServerUnaryReactor* GatewayService::Score(grpc::CallbackServerContext* ctx,
                                                const v1::ScoreRequest* req,
                                                v1::ScoreResponse* resp) {
  auto* reactor = new CancellableUnaryReactor();
  ScoreOptions so;
  so.log_probs = req->log_probs();
  so.top_k = req->top_log_probs();
  so.token_log_probs = req->token_log_probs();
  so.omit_logits = req->omit_logits();
  if (absl::Status s = ValidateScoreOptions(so, config_.vocab_size); !s.ok()) {
    metrics_->CountRequest("Score", s.code());
    reactor->Finish(ToGrpcStatus(s));
    return reactor;
  }
  GenerationRequest g;
  g.prompt.assign(req->tokens().begin(), req->tokens().end());
  g.score_only = true;
  g.deadline = absl::FromChrono(ctx->deadline());
  g.cancel = reactor->cancel();
  auto tokens = std::make_shared<std::vector<int32_t>>(g.prompt);
  const absl::Time received = absl::Now();
  // The callback runs on the scheduler thread: it only hands the logits to the score pool,
  // where the per-position work (log-softmax, top-k) and the response are built.
  absl::Status s = scheduler_->Submit(std::move(g), [reactor, resp, so, tokens, pool = score_pool_,
                                                     metrics = metrics_,
                                                     received](const GenerationEvent& ev) {
    if (!ev.done) return;
    auto finish = [reactor, metrics, received](const absl::Status& st) {
      metrics->CountRequest("Score", st.code());
      metrics->ObserveLatency("Score", absl::ToDoubleSeconds(absl::Now() - received));
      reactor->Finish(ToGrpcStatus(st));
    };
    if (!ev.status.ok()) {
      finish(ev.status);
      return;
    }
    metrics->AddTokens(ev.prompt_tokens, 0);
    auto work = [resp, so, tokens, logits = ev.logits, finish]() mutable {
      absl::StatusOr<ScoreOutputs> out = ComputeScoreOutputs(std::move(logits), *tokens, so);
      if (!out.ok()) {
        finish(out.status());
        return;
      }
      if (!so.omit_logits) TensorToProto(out->logits, DType::kF32, resp->mutable_logits());
      resp->set_log_probs(so.log_probs);
      for (size_t i = 0; i < out->top_ids.size(); ++i) {
        auto* t = resp->add_top();
        t->mutable_ids()->Assign(out->top_ids[i].begin(), out->top_ids[i].end());
        t->mutable_log_probs()->Assign(out->top_log_probs[i].begin(), out->top_log_probs[i].end());
      }
      resp->mutable_token_log_probs()->Assign(out->token_log_probs.begin(),
                                              out->token_log_probs.end());
      finish(absl::OkStatus());
    };
    if (!pool->TrySchedule(std::move(work))) {
      finish(absl::ResourceExhaustedError("too many scores being finished"));
    }
  });
  if (!s.ok()) {
    metrics_->CountRequest("Score", s.code());
    reactor->Finish(ToGrpcStatus(s));
  }
  return reactor;
}

grpc::ServerUnaryReactor* GatewayService::ModelInfo(grpc::CallbackServerContext* ctx,
                                                    const v1::ModelInfoRequest* req,
                                                    v1::ModelInfoResponse* resp) {
  resp->set_architecture(config_.arch == Arch::kMixtral ? "MixtralForCausalLM"
                                                        : "DeepseekV3ForCausalLM");
  resp->set_vocab_size(config_.vocab_size);
  resp->set_hidden_size(config_.hidden_size);
  resp->set_num_layers(config_.num_layers);
  resp->set_num_experts(config_.num_experts);
  resp->set_experts_per_token(config_.top_k);
  resp->set_max_position_embeddings(config_.max_position_embeddings);
  for (int l : config_.MoeLayers()) resp->add_moe_layers(l);
  resp->set_num_shared_experts(config_.n_shared_experts);
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

}  // namespace moemesh::gateway
