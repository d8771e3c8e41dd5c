#include "tools/cli/commands.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <iostream>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "nlohmann/json.hpp"
#include "services/common/status_macros.h"
#include "services/engine/inproc.h"
#include "services/engine/scheduler.h"
#include "services/engine/score_outputs.h"
#include "services/model/generator.h"
#include "services/model/tokenizer.h"

namespace moemesh::cli {

absl::Status MakeModel(const MakeModelArgs& a) {
  if (a.out.empty()) return absl::InvalidArgumentError("--out is required");
  GeneratorOptions o;
  if (a.arch == "mixtral") {
    o.config = SmallMixtralConfig(a.vocab, a.hidden, a.intermediate, a.layers, a.heads, a.kv_heads,
                                  a.experts, a.top_k);
  } else if (a.arch == "deepseek_v3") {
    ModelConfig& c = o.config;
    c = SmallDeepseekConfig(a.vocab, a.hidden, a.layers);
    c.intermediate_size = a.intermediate;
    c.moe_intermediate_size = a.moe_intermediate > 0 ? a.moe_intermediate : a.intermediate / 4;
    c.num_heads = a.heads;
    c.num_kv_heads = a.heads;
    c.num_experts = a.experts;
    c.top_k = a.top_k;
    c.n_shared_experts = a.shared_experts;
    c.first_k_dense_replace = a.dense_layers;
    c.moe_layer_freq = a.moe_layer_freq;
    c.n_group = a.n_group;
    c.topk_group = a.topk_group;
    if (a.topk_method == "noaux_tc") {
      c.topk_method = TopkMethod::kNoauxTc;
    } else if (a.topk_method == "greedy") {
      c.topk_method = TopkMethod::kGreedy;
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat("unsupported --topk-method '", a.topk_method, "' (noaux_tc, greedy)"));
    }
    if (a.scoring == "sigmoid") {
      c.scoring = ScoringFunc::kSigmoid;
    } else if (a.scoring == "softmax") {
      c.scoring = ScoringFunc::kSoftmax;
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat("unsupported --scoring '", a.scoring, "' (sigmoid, softmax)"));
    }
    c.norm_topk_prob = a.norm_topk_prob;
    c.routed_scaling_factor = static_cast<float>(a.routed_scaling);
    c.q_lora_rank = a.q_lora_rank;
    c.kv_lora_rank = a.kv_lora_rank;
    c.qk_nope_head_dim = a.qk_nope_dim;
    c.qk_rope_head_dim = a.qk_rope_dim;
    c.v_head_dim = a.v_head_dim;
    c.head_dim = a.qk_nope_dim + a.qk_rope_dim;
    if (a.rope_factor > 0) {
      c.rope_factor = static_cast<float>(a.rope_factor);
      c.rope_original_max_position =
          a.rope_original_max > 0 ? a.rope_original_max
                                  : std::max(1, static_cast<int>(a.max_position / a.rope_factor));
      c.rope_beta_fast = static_cast<float>(a.rope_beta_fast);
      c.rope_beta_slow = static_cast<float>(a.rope_beta_slow);
      c.rope_mscale = static_cast<float>(a.rope_mscale);
      c.rope_mscale_all_dim = static_cast<float>(a.rope_mscale_all_dim);
    }
    c.num_nextn_predict_layers = a.mtp_layers;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("unsupported --arch '", a.arch, "' (supported: mixtral, deepseek_v3)"));
  }
  o.config.max_position_embeddings = a.max_position;
  o.config.rope_theta = static_cast<float>(a.rope_theta);
  if (a.dtype == "f32") {
    o.dtype = DType::kF32;
  } else if (a.dtype == "f16") {
    o.dtype = DType::kF16;
  } else if (a.dtype == "bf16") {
    o.dtype = DType::kBF16;
  } else if (a.dtype == "fp8") {
    o.dtype = DType::kF8E4M3;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("unsupported --dtype '", a.dtype, "' (f32, f16, bf16, fp8)"));
  }
  o.seed = a.seed;
  o.shard_bytes = static_cast<size_t>(a.shard_mb) << 20;
  RETURN_IF_ERROR(GenerateModel(o, a.out));
  std::cerr << "wrote " << a.out << "\n";
  return absl::OkStatus();
}

namespace {

// Prompt tokens from --tokens or --prompt (through the model's tokenizer).
absl::StatusOr<std::vector<int32_t>> PromptTokens(const std::string& text,
                                                  const std::vector<int32_t>& tokens,
                                                  const Tokenizer* tok) {
  if (!tokens.empty()) return tokens;
  if (text.empty()) return absl::InvalidArgumentError("give --prompt TEXT or --tokens 1,2,3");
  if (tok == nullptr)
    return absl::FailedPreconditionError("the model has no tokenizer.json; use --tokens");
  return tok->Encode(text);
}

void PrintScore(const std::vector<int32_t>& tokens, const Tensor& logits, bool logprobs) {
  nlohmann::json j;
  j["tokens"] = tokens;
  nlohmann::json rows = nlohmann::json::array();
  const int64_t v = logits.dim(1);
  for (int64_t r = 0; r < logits.dim(0); ++r) {
    const float* row = logits.row(r);
    std::vector<float> out(row, row + v);
    if (logprobs) {
      float mx = out[0];
      for (float x : out) mx = std::max(mx, x);
      double sum = 0;
      for (float x : out) sum += std::exp(static_cast<double>(x - mx));
      const float lse = mx + static_cast<float>(std::log(sum));
      for (float& x : out) x -= lse;
    }
    rows.push_back(out);
  }
  j[logprobs ? "logprobs" : "logits"] = rows;
  std::cout << j.dump() << "\n";
}

}  // namespace

absl::Status GenerateViaGateway(const Common& c, const GenerateArgs& a);
absl::Status ScoreViaGateway(const Common& c, const std::vector<int32_t>& tokens, bool logprobs,
                             int top_logprobs);

absl::Status Generate(const Common& c, const GenerateArgs& a) {
  if (!c.gateway.empty()) return GenerateViaGateway(c, a);
  if (c.model.empty()) return absl::InvalidArgumentError("give --model DIR or --gateway ADDR");
  ASSIGN_OR_RETURN(auto m, InprocModel::Load(c.model, InprocOptions{c.groups, c.top_k}));
  auto tok = Tokenizer::Load(c.model + "/tokenizer.json");
  const Tokenizer* tp = tok.ok() ? &*tok : nullptr;
  ASSIGN_OR_RETURN(std::vector<int32_t> prompt, PromptTokens(a.prompt, a.tokens, tp));
  const bool text_mode = a.tokens.empty();
  Scheduler sched(m->engine.get(), SchedulerOptions{});
  GenerationRequest req;
  req.prompt = prompt;
  req.max_tokens = a.max_tokens;
  req.sampling = a.sampling;
  absl::Notification done;
  absl::Status result;
  int64_t n = 0;
  const absl::Time start = absl::Now();
  absl::Time first = start;
  RETURN_IF_ERROR(sched.Submit(std::move(req), [&](const GenerationEvent& ev) {
    if (!ev.done) {
      if (n++ == 0) first = absl::Now();
      if (text_mode) {
        std::cout << tp->DecodeOne(ev.token);
      } else {
        std::cout << (n > 1 ? "," : "") << ev.token;
      }
      std::cout.flush();
      return;
    }
    result = ev.status;
    done.Notify();
  }));
  done.WaitForNotification();
  std::cout << std::endl;
  const double total = absl::ToDoubleSeconds(absl::Now() - start);
  std::fprintf(
      stderr, "[%lld prompt tokens, %lld generated, first token %.3f s, %.1f tokens/s]\n",
      static_cast<long long>(prompt.size()), static_cast<long long>(n),
      absl::ToDoubleSeconds(first - start),
      n > 1 ? (n - 1) / std::max(1e-9, total - absl::ToDoubleSeconds(first - start)) : 0.0);
  return result;
}

absl::Status Score(const Common& c, const std::vector<int32_t>& tokens, bool logprobs,
                   int top_logprobs) {
  if (tokens.empty()) return absl::InvalidArgumentError("--tokens is required");
  if (!c.gateway.empty()) return ScoreViaGateway(c, tokens, logprobs, top_logprobs);
  if (c.model.empty()) return absl::InvalidArgumentError("give --model DIR or --gateway ADDR");
  ASSIGN_OR_RETURN(auto m, InprocModel::Load(c.model, InprocOptions{c.groups, c.top_k}));
  ASSIGN_OR_RETURN(Tensor logits, m->engine->Score(tokens));
  if (top_logprobs <= 0) {
    PrintScore(tokens, logits, logprobs);
    return absl::OkStatus();
  }
  ASSIGN_OR_RETURN(
      ScoreOutputs out,
      ComputeScoreOutputs(std::move(logits), tokens,
                          {.top_k = top_logprobs, .token_log_probs = true, .omit_logits = true}));
  PrintTopLogProbs(tokens, out.top_ids, out.top_log_probs, out.token_log_probs);
  return absl::OkStatus();
}

void PrintTopLogProbs(const std::vector<int32_t>& tokens,
                      const std::vector<std::vector<int32_t>>& top_ids,
                      const std::vector<std::vector<float>>& top_log_probs,
                      const std::vector<float>& token_log_probs) {
  nlohmann::json j;
  j["tokens"] = tokens;
  j["token_logprobs"] = token_log_probs;
  nlohmann::json top = nlohmann::json::array();
  for (size_t i = 0; i < top_ids.size(); ++i) {
    top.push_back({{"ids", top_ids[i]}, {"logprobs", top_log_probs[i]}});
  }
  j["top"] = top;
  std::cout << j.dump() << "\n";
}

}  // namespace moemesh::cli
