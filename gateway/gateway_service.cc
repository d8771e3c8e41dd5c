#include "gateway/gateway_service.h"

#include <cmath>
#include <deque>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "nlohmann/json.hpp"
#include "services/common/status_macros.h"
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

// Pushes to the call behind `link` if it is still there.
void PushTo(const std::shared_ptr<GenerateReactor::Link>& link,
            std::unique_ptr<v1::GenerateResponse> msg, bool last, grpc::Status status) {
  absl::MutexLock lock(&link->mu);
  if (link->reactor != nullptr) link->reactor->Push(std::move(msg), last, std::move(status));
}

absl::StatusOr<nlohmann::ordered_json> ChatToJson(const v1::Chat& chat,
                                                  nlohmann::ordered_json* tools) {
  nlohmann::ordered_json messages = nlohmann::ordered_json::array();
  for (const v1::ChatMessage& m : chat.messages())
    messages.push_back({{"role", m.role()}, {"content", m.content()}});
  *tools = nullptr;
  if (!chat.tools_json().empty()) {
    *tools = nlohmann::ordered_json::parse(chat.tools_json(), nullptr, /*allow_exceptions=*/false);
    if (tools->is_discarded() || !tools->is_array())
      return absl::InvalidArgumentError("chat.tools_json must be a JSON array");
  }
  return messages;
}

grpc::Status Unauthenticated() {
  return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                      "missing or wrong API key: send 'authorization: Bearer KEY' metadata");
}

absl::StatusOr<TextRequest> FromProto(const v1::GenerateRequest& req) {
  TextRequest r;
  switch (req.input_case()) {
    case v1::GenerateRequest::kPrompt:
      r.input = TextRequest::Input::kText;
      r.prompt = req.prompt();
      r.add_special_tokens = !req.has_add_special_tokens() || req.add_special_tokens();
      break;
    case v1::GenerateRequest::kPromptTokens:
      r.input = TextRequest::Input::kIds;
      r.prompt_ids.assign(req.prompt_tokens().ids().begin(), req.prompt_tokens().ids().end());
      break;
    case v1::GenerateRequest::kChat: {
      r.input = TextRequest::Input::kChat;
      ASSIGN_OR_RETURN(r.messages, ChatToJson(req.chat(), &r.tools));
      break;
    }
    default:
      return absl::InvalidArgumentError("give prompt, prompt_tokens or chat");
  }
  const v1::SamplingParams& sp = req.sampling();
  r.max_tokens = req.max_tokens();
  if (sp.has_temperature()) r.temperature = sp.temperature();
  if (sp.has_top_k()) r.top_k = sp.top_k();
  if (sp.has_top_p()) r.top_p = sp.top_p();
  r.seed = sp.seed();
  r.stop_token_ids.assign(req.stop_token_ids().begin(), req.stop_token_ids().end());
  r.stop.assign(req.stop().begin(), req.stop().end());
  r.ignore_eos = req.ignore_eos();
  r.skip_special_tokens = !req.has_skip_special_tokens() || req.skip_special_tokens();
  r.api = "grpc";
  return r;
}

}  // namespace

GatewayService::GatewayService(Scheduler* scheduler, const ModelConfig& config,
                               TextGenerator* generator, Metrics* metrics, const ApiKeys* keys)
    : scheduler_(scheduler),
      config_(config),
      generator_(generator),
      metrics_(metrics),
      keys_(keys),
      score_pool_(std::make_shared<ThreadPool>(2, 256)) {}

GatewayService::~GatewayService() = default;

bool GatewayService::Authorized(grpc::CallbackServerContext* ctx) const {
  if (keys_ == nullptr || !keys_->enabled()) return true;
  const auto& md = ctx->client_metadata();
  auto it = md.find("authorization");
  if (it == md.end()) return false;
  return keys_->Check(absl::string_view(it->second.data(), it->second.size()));
}

grpc::ServerWriteReactor<v1::GenerateResponse>* GatewayService::Generate(
    grpc::CallbackServerContext* ctx, const v1::GenerateRequest* req) {
  auto* reactor = new GenerateReactor(metrics_);
  if (!Authorized(ctx)) {
    reactor->Push(nullptr, true, Unauthenticated());
    return reactor;
  }
  absl::StatusOr<TextRequest> r = FromProto(*req);
  if (!r.ok()) {
    reactor->Push(nullptr, true, ToGrpcStatus(r.status()));
    return reactor;
  }
  r->deadline = absl::FromChrono(ctx->deadline());
  r->cancel = reactor->cancel();
  absl::Status s = generator_->Start(*std::move(r), [link = reactor->link()](TextEvent ev) {
    auto msg = std::make_unique<v1::GenerateResponse>();
    msg->mutable_usage()->set_prompt_tokens(ev.prompt_tokens);
    msg->mutable_usage()->set_completion_tokens(ev.completion_tokens);
    msg->set_text(std::move(ev.text));
    if (!ev.done) {
      msg->add_token_ids(ev.token);
      PushTo(link, std::move(msg), false, grpc::Status::OK);
      return;
    }
    if (!ev.status.ok()) {
      PushTo(link, nullptr, true, ToGrpcStatus(ev.status));
      return;
    }
    msg->set_finish_reason(ToProtoReason(ev.finish_reason));
    msg->set_matched_stop(ev.matched_stop);
    PushTo(link, std::move(msg), true, grpc::Status::OK);
  });
  if (!s.ok()) reactor->Push(nullptr, true, ToGrpcStatus(s));
  return reactor;
}

grpc::ServerUnaryReactor* GatewayService::Score(grpc::CallbackServerContext* ctx,
                                                const v1::ScoreRequest* req,
                                                v1::ScoreResponse* resp) {
  auto* reactor = new CancellableUnaryReactor();
  if (!Authorized(ctx)) {
    metrics_->CountRequest("Score", absl::StatusCode::kUnauthenticated);
    reactor->Finish(Unauthenticated());
    return reactor;
  }
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
  for (int32_t id : generator_->text().eos_token_ids()) resp->add_eos_token_ids(id);
  resp->set_has_tokenizer(generator_->text().tokenizer() != nullptr);
  resp->set_has_chat_template(generator_->text().has_chat_template());
  if (generator_->text().tokenizer() != nullptr) {
    resp->set_bos_token(generator_->text().tokenizer()->bos_token());
    resp->set_eos_token(generator_->text().tokenizer()->eos_token());
  }
  const GenerationConfig& d = generator_->text().generation();
  if (d.temperature) resp->mutable_default_sampling()->set_temperature(*d.temperature);
  if (d.top_p) resp->mutable_default_sampling()->set_top_p(*d.top_p);
  if (d.top_k) resp->mutable_default_sampling()->set_top_k(*d.top_k);
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  if (!Authorized(ctx)) {
    reactor->Finish(Unauthenticated());
    return reactor;
  }
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* GatewayService::Tokenize(grpc::CallbackServerContext* ctx,
                                                   const v1::TokenizeRequest* req,
                                                   v1::TokenizeResponse* resp) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  if (!Authorized(ctx)) {
    reactor->Finish(Unauthenticated());
    return reactor;
  }
  // The request and response live until Finish, so the pool may use them.
  auto work = [this, req, resp, reactor, metrics = metrics_]() {
    const TextModel& text = generator_->text();
    auto run = [&]() -> absl::Status {
      std::vector<int32_t> ids;
      switch (req->input_case()) {
        case v1::TokenizeRequest::kText: {
          ASSIGN_OR_RETURN(ids, text.Encode(req->text(), !req->has_add_special_tokens() ||
                                                             req->add_special_tokens()));
          break;
        }
        case v1::TokenizeRequest::kChat: {
          nlohmann::ordered_json tools;
          ASSIGN_OR_RETURN(nlohmann::ordered_json messages, ChatToJson(req->chat(), &tools));
          const bool gen_prompt = !req->has_add_generation_prompt() || req->add_generation_prompt();
          ASSIGN_OR_RETURN(std::string rendered, text.RenderChat(messages, gen_prompt, tools));
          ASSIGN_OR_RETURN(ids, text.Encode(rendered, req->has_add_special_tokens() &&
                                                          req->add_special_tokens()));
          resp->set_text(std::move(rendered));
          break;
        }
        default:
          return absl::InvalidArgumentError("give text or chat");
      }
      resp->mutable_ids()->Add(ids.begin(), ids.end());
      return absl::OkStatus();
    };
    const absl::Status s = run();
    metrics->CountRequest("Tokenize", s.code());
    reactor->Finish(ToGrpcStatus(s));
  };
  if (!generator_->RunText(std::move(work))) {
    metrics_->CountRequest("Tokenize", absl::StatusCode::kResourceExhausted);
    reactor->Finish(ToGrpcStatus(
        absl::ResourceExhaustedError("the gateway's tokenizer queue is full; retry later")));
  }
  return reactor;
}

grpc::ServerUnaryReactor* GatewayService::Detokenize(grpc::CallbackServerContext* ctx,
                                                     const v1::DetokenizeRequest* req,
                                                     v1::DetokenizeResponse* resp) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  if (!Authorized(ctx)) {
    reactor->Finish(Unauthenticated());
    return reactor;
  }
  auto work = [this, req, resp, reactor, metrics = metrics_]() {
    std::vector<int32_t> ids(req->ids().begin(), req->ids().end());
    absl::StatusOr<std::string> out = generator_->text().Decode(ids, req->skip_special_tokens());
    if (out.ok()) resp->set_text(*std::move(out));
    metrics->CountRequest("Detokenize", out.status().code());
    reactor->Finish(ToGrpcStatus(out.status()));
  };
  if (!generator_->RunText(std::move(work))) {
    metrics_->CountRequest("Detokenize", absl::StatusCode::kResourceExhausted);
    reactor->Finish(ToGrpcStatus(
        absl::ResourceExhaustedError("the gateway's tokenizer queue is full; retry later")));
  }
  return reactor;
}

}  // namespace moemesh::gateway
