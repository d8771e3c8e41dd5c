#include "tools/cli/commands.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <optional>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "nlohmann/json.hpp"
#include "services/common/status_macros.h"
#include "services/engine/inproc.h"
#include "services/engine/scheduler.h"
#include "services/engine/score_outputs.h"
#include "services/model/generator.h"
#include "services/text/text_model.h"

namespace moemesh::cli {

namespace {

absl::StatusOr<std::string> ReadWhole(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

absl::Status WriteWhole(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
  out.close();
  if (!out) return absl::InternalError(absl::StrCat("cannot write ", path));
  return absl::OkStatus();
}

// Copies a real tokenizer into a generated model, with a generation_config.json whose EOS/BOS
// ids are the source's (its generation_config.json, else the tokenizer's eos/bos tokens).
absl::Status CopyTokenizer(const std::string& from, const Tokenizer& tok, const std::string& out) {
  ASSIGN_OR_RETURN(std::string tj, ReadWhole(from + "/tokenizer.json"));
  RETURN_IF_ERROR(WriteWhole(out + "/tokenizer.json", tj));
  if (auto tc = ReadWhole(from + "/tokenizer_config.json"); tc.ok()) {
    RETURN_IF_ERROR(WriteWhole(out + "/tokenizer_config.json", *tc));
  } else {
    std::filesystem::remove(out + "/tokenizer_config.json");
  }
  if (auto gc = ReadWhole(from + "/generation_config.json"); gc.ok()) {
    return WriteWhole(out + "/generation_config.json", *gc);
  }
  nlohmann::json g = nlohmann::json::object();
  if (auto id = tok.TokenToId(tok.eos_token()); id && !tok.eos_token().empty())
    g["eos_token_id"] = *id;
  if (auto id = tok.TokenToId(tok.bos_token()); id && !tok.bos_token().empty())
    g["bos_token_id"] = *id;
  return WriteWhole(out + "/generation_config.json", g.dump(2) + "\n");
}

}  // namespace

absl::Status MakeModel(const MakeModelArgs& a) {
  if (a.out.empty()) return absl::InvalidArgumentError("--out is required");
  int vocab = a.vocab;
  std::shared_ptr<const Tokenizer> tok;
  if (!a.tokenizer_from.empty()) {
    ASSIGN_OR_RETURN(tok, Tokenizer::LoadDir(a.tokenizer_from));
    if (a.vocab_given && a.vocab < tok->vocab_size())
      return absl::InvalidArgumentError(
          absl::StrCat("--vocab ", a.vocab, " is smaller than the tokenizer's ", tok->vocab_size(),
                       " ids (", a.tokenizer_from, ")"));
    if (!a.vocab_given) vocab = tok->vocab_size();
  }
  GeneratorOptions o;
  if (a.arch == "mixtral") {
    o.config = SmallMixtralConfig(vocab, a.hidden, a.intermediate, a.layers, a.heads, a.kv_heads,
                                  a.experts, a.top_k);
  } else if (a.arch == "deepseek_v3") {
    ModelConfig& c = o.config;
    c = SmallDeepseekConfig(vocab, a.hidden, a.layers);
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
  if (tok) RETURN_IF_ERROR(CopyTokenizer(a.tokenizer_from, *tok, a.out));
  std::cerr << "wrote " << a.out << "\n";
  return absl::OkStatus();
}

namespace {

// Prompt tokens from --tokens, --chat or --prompt (through the model's tokenizer).
absl::StatusOr<std::vector<int32_t>> PromptTokens(const GenerateArgs& a, const TextModel& text) {
  if (!a.tokens.empty()) return a.tokens;
  if (!a.messages.is_null()) return text.EncodeChat(a.messages, /*add_generation_prompt=*/true);
  if (a.prompt.empty())
    return absl::InvalidArgumentError("give --prompt TEXT, --chat FILE or --tokens 1,2,3");
  return text.Encode(a.prompt);
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

// A model loaded in this process, with its text side.
struct Local {
  std::unique_ptr<InprocModel> model;
  std::shared_ptr<const TextModel> text;
};

InprocOptions LocalOptions(const Common& c) {
  InprocOptions o;
  o.groups = c.groups;
  o.top_k = c.top_k;
  return o;
}

absl::StatusOr<Local> LoadLocal(const Common& c) {
  if (c.model.empty()) return absl::InvalidArgumentError("give --model DIR or --gateway ADDR");
  Local l;
  ASSIGN_OR_RETURN(l.text, TextModel::LoadDir(c.model));
  ASSIGN_OR_RETURN(l.model, InprocModel::Load(c.model, LocalOptions(c)));
  return l;
}

// Generates in process, printing text (or ids when the prompt was ids) as it comes; returns
// the generated text.
absl::StatusOr<std::string> GenerateLocal(const Local& l, const GenerateArgs& a) {
  ASSIGN_OR_RETURN(std::vector<int32_t> prompt, PromptTokens(a, *l.text));
  const bool text_mode = a.tokens.empty();
  if (!a.stop.empty() && l.text->tokenizer() == nullptr)
    return absl::FailedPreconditionError("--stop needs the model's tokenizer.json");
  auto sched = std::make_unique<Scheduler>(l.model->engine.get(), SchedulerOptions{});
  GenerationRequest req;
  req.prompt = prompt;
  req.max_tokens = a.max_tokens;
  req.sampling = a.sampling;
  const GenerationConfig& d = l.text->generation();
  if (!a.temperature_set) req.sampling.temperature = d.temperature.value_or(0.0f);
  if (!a.top_k_set) req.sampling.top_k = d.top_k.value_or(0);
  if (!a.top_p_set) req.sampling.top_p = d.top_p.value_or(1.0f);
  if (!a.ignore_eos) req.stop_tokens = l.text->eos_token_ids();
  req.cancel = std::make_shared<CancelFlag>();
  std::optional<TextStream> stream;
  if (l.text->tokenizer() != nullptr) stream.emplace(l.text->tokenizer(), a.stop);
  absl::Notification done;
  absl::Status result;
  std::string text, finish;
  int64_t n = 0;
  const absl::Time start = absl::Now();
  absl::Time first = start;
  auto cancel = req.cancel;
  RETURN_IF_ERROR(sched->Submit(std::move(req), [&](const GenerationEvent& ev) {
    if (done.HasBeenNotified()) return;  // after a stop string: the cancellation's event
    if (!ev.done) {
      if (n++ == 0) first = absl::Now();
      std::string piece;
      if (stream) piece = stream->Push(ev.token);
      if (text_mode) {
        std::cout << piece;
      } else {
        std::cout << (n > 1 ? "," : "") << ev.token;
      }
      std::cout.flush();
      text += piece;
      if (stream && stream->stopped()) {
        finish = "stop";
        cancel->Cancel();
        done.Notify();
      }
      return;
    }
    if (stream) {
      std::string rest = stream->Finish();
      if (text_mode) std::cout << rest;
      text += rest;
    }
    finish = ev.finish_reason;
    result = ev.status;
    done.Notify();
  }));
  done.WaitForNotification();
  sched.reset();  // joins the loop thread while what the callback uses still exists
  std::cout << std::endl;
  const double total = absl::ToDoubleSeconds(absl::Now() - start);
  std::fprintf(
      stderr, "[%lld prompt tokens, %lld generated, %s, first token %.3f s, %.1f tokens/s]\n",
      static_cast<long long>(prompt.size()), static_cast<long long>(n), finish.c_str(),
      absl::ToDoubleSeconds(first - start),
      n > 1 ? (n - 1) / std::max(1e-9, total - absl::ToDoubleSeconds(first - start)) : 0.0);
  RETURN_IF_ERROR(result);
  return text;
}

}  // namespace

absl::StatusOr<nlohmann::ordered_json> ReadChatFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::InvalidArgumentError(absl::StrCat("cannot read --chat file ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  nlohmann::ordered_json j =
      nlohmann::ordered_json::parse(ss.str(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return absl::InvalidArgumentError(absl::StrCat(path, " is not valid JSON"));
  auto msgs = NormaliseChatMessages(j);
  if (!msgs.ok())
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", msgs.status().message()));
  return *msgs;
}

absl::Status Generate(const Common& c, const GenerateArgs& a) {
  if (!c.gateway.empty()) return GenerateViaGateway(c, a).status();
  ASSIGN_OR_RETURN(Local l, LoadLocal(c));
  return GenerateLocal(l, a).status();
}

absl::Status Chat(const Common& c, const GenerateArgs& a) {
  std::optional<Local> local;
  if (c.gateway.empty()) {
    ASSIGN_OR_RETURN(Local l, LoadLocal(c));
    if (!l.text->has_chat_template())
      return absl::FailedPreconditionError(
          absl::StrCat(c.model, " has no chat template (tokenizer_config.json chat_template)"));
    local = std::move(l);
  }
  auto answer = [&](const GenerateArgs& g) -> absl::StatusOr<std::string> {
    if (local) return GenerateLocal(*local, g);
    return GenerateViaGateway(c, g);
  };
  if (!a.messages.is_null()) return answer(a).status();
  // A conversation on standard input.
  GenerateArgs g = a;
  g.messages = nlohmann::ordered_json::array();
  std::string line;
  while (true) {
    std::cerr << "> " << std::flush;
    if (!std::getline(std::cin, line)) break;
    if (line.empty()) continue;
    g.messages.push_back({{"role", "user"}, {"content", line}});
    ASSIGN_OR_RETURN(std::string reply, answer(g));
    g.messages.push_back({{"role", "assistant"}, {"content", reply}});
  }
  return absl::OkStatus();
}

absl::Status Tokenize(const Common& c, const TokenizeArgs& a) {
  if (!c.gateway.empty()) return TokenizeViaGateway(c, a);
  if (c.model.empty()) return absl::InvalidArgumentError("give --model DIR or --gateway ADDR");
  ASSIGN_OR_RETURN(std::shared_ptr<const TextModel> text, TextModel::LoadDir(c.model));
  std::vector<int32_t> ids;
  if (!a.messages.is_null()) {
    ASSIGN_OR_RETURN(ids, text->EncodeChat(a.messages, /*add_generation_prompt=*/true));
  } else {
    ASSIGN_OR_RETURN(ids, text->Encode(a.prompt, a.add_special_tokens));
  }
  std::cout << nlohmann::json{{"ids", ids}}.dump() << "\n";
  return absl::OkStatus();
}

absl::Status Detokenize(const Common& c, const std::vector<int32_t>& ids,
                        bool skip_special_tokens) {
  if (!c.gateway.empty()) return DetokenizeViaGateway(c, ids, skip_special_tokens);
  if (c.model.empty()) return absl::InvalidArgumentError("give --model DIR or --gateway ADDR");
  ASSIGN_OR_RETURN(std::shared_ptr<const TextModel> text, TextModel::LoadDir(c.model));
  ASSIGN_OR_RETURN(std::string out, text->Decode(ids, skip_special_tokens));
  std::cout << nlohmann::json{{"text", out}}.dump(-1, ' ', false,
                                                  nlohmann::json::error_handler_t::replace)
            << "\n";
  return absl::OkStatus();
}

absl::Status Score(const Common& c, const std::vector<int32_t>& tokens, bool logprobs,
                   int top_logprobs) {
  if (tokens.empty()) return absl::InvalidArgumentError("--tokens is required");
  if (!c.gateway.empty()) return ScoreViaGateway(c, tokens, logprobs, top_logprobs);
  if (c.model.empty()) return absl::InvalidArgumentError("give --model DIR or --gateway ADDR");
  ASSIGN_OR_RETURN(auto m, InprocModel::Load(c.model, LocalOptions(c)));
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
