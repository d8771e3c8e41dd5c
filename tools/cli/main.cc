// moemesh: the command-line tool.
//
//   moemesh make-model --arch mixtral|deepseek_v3 --out DIR [--vocab --hidden ... --dtype --seed]
//                      [--tokenizer_from DIR]
//   moemesh generate   (--model DIR | --gateway ADDR) (--prompt TEXT | --chat FILE |
//                      --tokens 1,2,3) [--max_tokens N --stop STR --ignore_eos]
//   moemesh chat       (--model DIR | --gateway ADDR) [--chat FILE] [--stop STR]
//   moemesh score      (--model DIR | --gateway ADDR) --tokens 1,2,3
//   moemesh tokenize   (--model DIR | --gateway ADDR) (--prompt TEXT | --chat FILE)
//   moemesh detokenize (--model DIR | --gateway ADDR) --ids 1,2,3
//   moemesh up         [--model DIR] --groups G [--replicas R]
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/status/statusor.h"
#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "services/rpc/tls.h"
#include "tools/cli/commands.h"

ABSL_FLAG(std::string, arch, "mixtral", "make-model: mixtral | deepseek_v3");
ABSL_FLAG(std::string, out, "", "make-model: output directory");
ABSL_FLAG(int, vocab, 0,
          "make-model: vocabulary size (0: the --tokenizer_from tokenizer's size, else 512)");
ABSL_FLAG(int, hidden, 256, "make-model: hidden size");
ABSL_FLAG(int, intermediate, 512,
          "make-model: expert FFN width (mixtral); dense-layer FFN width (deepseek_v3)");
ABSL_FLAG(int, layers, 4, "make-model: layers");
ABSL_FLAG(int, heads, 8, "make-model: attention heads");
ABSL_FLAG(int, kv_heads, 2, "make-model: key/value heads");
ABSL_FLAG(int, experts, 8, "make-model: routed experts per layer");
ABSL_FLAG(int, top_k, 0,
          "experts per token (make-model: written to config, default 2; "
          "generate/score: overrides the config when > 0)");
ABSL_FLAG(std::string, dtype, "f32",
          "make-model: f32 | f16 | bf16 | fp8 (E4M3 projections with 128x128 block scales)");
ABSL_FLAG(uint64_t, seed, 0, "make-model: weight seed; generate: sampling seed");
ABSL_FLAG(int, shard_mb, 0, "make-model: write shards of about this many MiB (0: one file)");
ABSL_FLAG(int, max_position, 4096, "make-model: max_position_embeddings");
ABSL_FLAG(double, rope_theta, 10000.0, "make-model: rope_theta");
// make-model --arch deepseek_v3 only.
ABSL_FLAG(int, moe_intermediate, 0, "deepseek_v3: routed expert FFN width (0: --intermediate / 4)");
ABSL_FLAG(int, shared_experts, 1, "deepseek_v3: n_shared_experts");
ABSL_FLAG(int, dense_layers, 1, "deepseek_v3: first_k_dense_replace");
ABSL_FLAG(int, moe_layer_freq, 1, "deepseek_v3: moe_layer_freq");
ABSL_FLAG(int, n_group, 4, "deepseek_v3: n_group (expert groups for group-limited routing)");
ABSL_FLAG(int, topk_group, 2, "deepseek_v3: topk_group (groups kept per token)");
ABSL_FLAG(std::string, topk_method, "noaux_tc", "deepseek_v3: noaux_tc | greedy");
ABSL_FLAG(std::string, scoring, "sigmoid", "deepseek_v3: scoring_func, sigmoid | softmax");
ABSL_FLAG(bool, norm_topk_prob, true, "deepseek_v3: renormalise the top-k weights");
ABSL_FLAG(double, routed_scaling, 2.5, "deepseek_v3: routed_scaling_factor");
ABSL_FLAG(int, q_lora_rank, 128, "deepseek_v3: q_lora_rank (0: null, a plain q_proj)");
ABSL_FLAG(int, kv_lora_rank, 64, "deepseek_v3: kv_lora_rank");
ABSL_FLAG(int, qk_nope_dim, 32, "deepseek_v3: qk_nope_head_dim");
ABSL_FLAG(int, qk_rope_dim, 16, "deepseek_v3: qk_rope_head_dim");
ABSL_FLAG(int, v_head_dim, 32, "deepseek_v3: v_head_dim");
ABSL_FLAG(double, rope_factor, 0.0, "deepseek_v3: YaRN rope_scaling factor (0: rope_scaling null)");
ABSL_FLAG(int, rope_original_max, 0,
          "deepseek_v3: YaRN original_max_position_embeddings (0: max_position / rope_factor)");
ABSL_FLAG(double, rope_beta_fast, 32.0, "deepseek_v3: YaRN beta_fast");
ABSL_FLAG(double, rope_beta_slow, 1.0, "deepseek_v3: YaRN beta_slow");
ABSL_FLAG(double, rope_mscale, 1.0, "deepseek_v3: YaRN mscale");
ABSL_FLAG(double, rope_mscale_all_dim, 1.0, "deepseek_v3: YaRN mscale_all_dim");
ABSL_FLAG(int, mtp_layers, 0, "deepseek_v3: num_nextn_predict_layers to write (never loaded)");

ABSL_FLAG(std::string, model, "", "model directory (Hugging Face layout)");
ABSL_FLAG(std::string, gateway, "", "generate/score through a running gateway at host:port");
ABSL_FLAG(std::string, prompt, "", "generate: prompt text");
ABSL_FLAG(std::string, tokens, "", "generate/score: comma-separated token ids");
ABSL_FLAG(int, max_tokens, 16, "generate: tokens to generate");
ABSL_FLAG(double, temperature, -1,
          "generate/chat: 0 is greedy (-1: the model's generation_config.json default, else 0)");
ABSL_FLAG(int, sample_top_k, -1,
          "generate/chat: sample among the k most likely (0: all; -1: the model's default, else "
          "all)");
ABSL_FLAG(double, top_p, -1,
          "generate/chat: nucleus sampling mass (-1: the model's default, else 1)");
ABSL_FLAG(std::string, chat, "",
          "generate/chat/tokenize: a JSON file holding an array of {\"role\",\"content\"} "
          "messages, rendered with the model's chat template and the generation prompt");
ABSL_FLAG(std::vector<std::string>, stop, {},
          "generate/chat: stop strings, comma-separated; C escapes such as \\n and \\, are "
          "understood");
ABSL_FLAG(bool, ignore_eos, false, "generate/chat: keep generating past the model's EOS ids");
ABSL_FLAG(bool, add_special_tokens, true,
          "tokenize: add the tokenizer's special tokens (BOS, ...) as Hugging Face does");
ABSL_FLAG(std::string, ids, "", "detokenize: comma-separated token ids");
ABSL_FLAG(bool, skip_special_tokens, false, "detokenize: leave special tokens out");
ABSL_FLAG(std::string, tokenizer_from, "",
          "make-model: copy tokenizer.json, tokenizer_config.json (and generation_config.json) "
          "from this directory; the vocabulary grows to the tokenizer's size");
ABSL_FLAG(bool, logprobs, false, "score: print log-probabilities instead of logits");
ABSL_FLAG(int, top_logprobs, 0,
          "score: print the N most likely next tokens per position and the log-probability of "
          "each given next token, instead of the full distribution");
ABSL_FLAG(int, groups, 1, "generate/score in process: local expert groups; up: expert groups");
ABSL_FLAG(int, replicas, 1, "up: replicas per expert group");
ABSL_FLAG(std::string, wire_dtype, "bf16", "up: activation dtype on the wire (f32 | bf16)");
ABSL_FLAG(std::string, worker_backend, "cpu",
          "up: where the expert workers compute: cpu | cuda (all of a group's experts on GPU 0)");
ABSL_FLAG(bool, shared_in_gateway, true,
          "up: run DeepSeek shared experts in the gateway, overlapped with the router call "
          "(--noshared_in_gateway: in expert group 0)");
ABSL_FLAG(int64_t, kv_cache_bytes, -1,
          "up: the gateway's KV cache bound in bytes (-1: the gateway's default, half the free "
          "memory)");
ABSL_FLAG(std::string, kv_cache_dtype, "", "up: the gateway's KV cache dtype, f32 | bf16");
ABSL_FLAG(int, micro_batches, 1,
          "up: micro-batches per gateway step (2: one half's attention overlaps the other's "
          "MoE call; the gateway splits a step only when that has been faster, see its "
          "--micro_batch_policy)");
ABSL_FLAG(int64_t, added_latency_us, 0,
          "up: one-way latency added on every hop inside the mesh (testbed; delaying proxies)");
ABSL_FLAG(std::string, gateway_cpus, "", "up: pin the gateway and router to these CPUs (\"0\")");
ABSL_FLAG(std::string, worker_cpus, "", "up: pin the expert workers to these CPUs (\"1\")");
ABSL_FLAG(std::string, address_file, "", "up: write the gateway address to this file once serving");
ABSL_FLAG(int, http_port, -1,
          "up: serve the OpenAI-compatible HTTP API on this gateway port (0: any; -1: off)");
ABSL_FLAG(std::string, api_key_file, "", "up: the gateway's API keys (one per line)");
ABSL_FLAG(std::string, chat_template, "",
          "up: a Jinja chat template file that replaces the model's");
ABSL_FLAG(bool, tls, false,
          "up: make a throwaway CA with openssl and run every service with mutual TLS");
ABSL_FLAG(std::string, tls_cert, "", "--gateway clients: PEM client certificate (mTLS)");
ABSL_FLAG(std::string, tls_key, "", "--gateway clients: PEM key of --tls_cert");
ABSL_FLAG(std::string, tls_ca, "", "--gateway clients: PEM CA to verify the gateway against");
ABSL_FLAG(double, timeout, 0, "generate/score via gateway: deadline in seconds (0: none)");

namespace {

// --stop: comma-separated, where "\\," is a literal comma and C escapes are understood.
absl::StatusOr<std::vector<std::string>> ParseStops(const std::vector<std::string>& parts) {
  // absl split the flag at every comma; a part ending in a backslash was an escaped comma.
  std::vector<std::string> joined;
  bool glue = false;
  for (const std::string& p : parts) {
    if (glue) {
      joined.back().pop_back();
      joined.back() += "," + p;
    } else {
      joined.push_back(p);
    }
    glue = !joined.back().empty() && joined.back().back() == '\\';
  }
  std::vector<std::string> out;
  for (const std::string& p : joined) {
    std::string u, err;
    if (!absl::CUnescape(p, &u, &err))
      return absl::InvalidArgumentError(absl::StrCat("bad --stop '", p, "': ", err));
    if (!u.empty()) out.push_back(u);
  }
  return out;
}

absl::StatusOr<std::vector<int32_t>> ParseTokens(const std::string& s) {
  std::vector<int32_t> out;
  for (absl::string_view p : absl::StrSplit(s, ',', absl::SkipWhitespace())) {
    int32_t v;
    if (!absl::SimpleAtoi(p, &v))
      return absl::InvalidArgumentError(absl::StrCat("bad token id '", p, "'"));
    out.push_back(v);
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "moemesh <command> [flags]\n\ncommands:\n"
      "  make-model  write a random checkpoint\n"
      "  generate    generate text or tokens (in process with --model, or via --gateway)\n"
      "  chat        answer a chat (--chat FILE), or converse line by line on stdin\n"
      "  score       print the logits of every position as JSON\n"
      "  tokenize    print the token ids of --prompt TEXT or --chat FILE as JSON\n"
      "  detokenize  print the text of --ids 1,2,3 as JSON\n"
      "  up          start the whole mesh on loopback");
  // Accept --kv-heads as well as --kv_heads: absl flag names use underscores.
  std::vector<std::string> storage(argv, argv + argc);
  for (std::string& a : storage) {
    if (a.rfind("--", 0) != 0) continue;
    const size_t end = std::min(a.find('='), a.size());
    for (size_t i = 2; i < end; ++i)
      if (a[i] == '-') a[i] = '_';
  }
  std::vector<char*> fixed;
  for (std::string& a : storage) fixed.push_back(a.data());
  std::vector<char*> args = absl::ParseCommandLine(argc, fixed.data());
  if (args.size() < 2) {
    std::cerr << absl::ProgramUsageMessage() << "\n";
    return 2;
  }
  const std::string cmd = args[1];
  if (!absl::GetFlag(FLAGS_tls_cert).empty() || !absl::GetFlag(FLAGS_tls_ca).empty() ||
      !absl::GetFlag(FLAGS_tls_key).empty()) {
    auto tls = moemesh::LoadTls(
        {absl::GetFlag(FLAGS_tls_cert), absl::GetFlag(FLAGS_tls_key), absl::GetFlag(FLAGS_tls_ca)});
    if (!tls.ok()) {
      std::cerr << "moemesh: " << tls.status().message() << "\n";
      return 2;
    }
    moemesh::SetClientTls(*std::move(tls));
  }
  moemesh::cli::Common c;
  c.model = absl::GetFlag(FLAGS_model);
  c.gateway = absl::GetFlag(FLAGS_gateway);
  c.top_k = absl::GetFlag(FLAGS_top_k);
  c.groups = absl::GetFlag(FLAGS_groups);
  c.timeout_s = absl::GetFlag(FLAGS_timeout);
  absl::Status status;
  if (cmd == "make-model") {
    moemesh::cli::MakeModelArgs m;
    m.arch = absl::GetFlag(FLAGS_arch);
    m.out = absl::GetFlag(FLAGS_out);
    m.vocab = absl::GetFlag(FLAGS_vocab) > 0 ? absl::GetFlag(FLAGS_vocab) : 512;
    m.hidden = absl::GetFlag(FLAGS_hidden);
    m.intermediate = absl::GetFlag(FLAGS_intermediate);
    m.layers = absl::GetFlag(FLAGS_layers);
    m.heads = absl::GetFlag(FLAGS_heads);
    m.kv_heads = absl::GetFlag(FLAGS_kv_heads);
    m.experts = absl::GetFlag(FLAGS_experts);
    m.top_k = c.top_k > 0 ? c.top_k : 2;
    m.dtype = absl::GetFlag(FLAGS_dtype);
    m.seed = absl::GetFlag(FLAGS_seed);
    m.shard_mb = absl::GetFlag(FLAGS_shard_mb);
    m.max_position = absl::GetFlag(FLAGS_max_position);
    m.rope_theta = absl::GetFlag(FLAGS_rope_theta);
    m.moe_intermediate = absl::GetFlag(FLAGS_moe_intermediate);
    m.shared_experts = absl::GetFlag(FLAGS_shared_experts);
    m.dense_layers = absl::GetFlag(FLAGS_dense_layers);
    m.moe_layer_freq = absl::GetFlag(FLAGS_moe_layer_freq);
    m.n_group = absl::GetFlag(FLAGS_n_group);
    m.topk_group = absl::GetFlag(FLAGS_topk_group);
    m.topk_method = absl::GetFlag(FLAGS_topk_method);
    m.scoring = absl::GetFlag(FLAGS_scoring);
    m.norm_topk_prob = absl::GetFlag(FLAGS_norm_topk_prob);
    m.routed_scaling = absl::GetFlag(FLAGS_routed_scaling);
    m.q_lora_rank = absl::GetFlag(FLAGS_q_lora_rank);
    m.kv_lora_rank = absl::GetFlag(FLAGS_kv_lora_rank);
    m.qk_nope_dim = absl::GetFlag(FLAGS_qk_nope_dim);
    m.qk_rope_dim = absl::GetFlag(FLAGS_qk_rope_dim);
    m.v_head_dim = absl::GetFlag(FLAGS_v_head_dim);
    m.rope_factor = absl::GetFlag(FLAGS_rope_factor);
    m.rope_original_max = absl::GetFlag(FLAGS_rope_original_max);
    m.rope_beta_fast = absl::GetFlag(FLAGS_rope_beta_fast);
    m.rope_beta_slow = absl::GetFlag(FLAGS_rope_beta_slow);
    m.rope_mscale = absl::GetFlag(FLAGS_rope_mscale);
    m.rope_mscale_all_dim = absl::GetFlag(FLAGS_rope_mscale_all_dim);
    m.mtp_layers = absl::GetFlag(FLAGS_mtp_layers);
    m.tokenizer_from = absl::GetFlag(FLAGS_tokenizer_from);
    m.vocab_given = absl::GetFlag(FLAGS_vocab) > 0;
    status = moemesh::cli::MakeModel(m);
  } else if (cmd == "tokenize") {
    moemesh::cli::TokenizeArgs t;
    t.prompt = absl::GetFlag(FLAGS_prompt);
    t.add_special_tokens = absl::GetFlag(FLAGS_add_special_tokens);
    if (!absl::GetFlag(FLAGS_chat).empty()) {
      auto m = moemesh::cli::ReadChatFile(absl::GetFlag(FLAGS_chat));
      if (!m.ok()) {
        std::cerr << "moemesh: " << m.status().message() << "\n";
        return 2;
      }
      t.messages = *std::move(m);
    }
    status = moemesh::cli::Tokenize(c, t);
  } else if (cmd == "detokenize") {
    auto ids = ParseTokens(absl::GetFlag(FLAGS_ids));
    if (!ids.ok()) {
      std::cerr << "moemesh: " << ids.status().message() << "\n";
      return 2;
    }
    status = moemesh::cli::Detokenize(c, *ids, absl::GetFlag(FLAGS_skip_special_tokens));
  } else if (cmd == "generate" || cmd == "score" || cmd == "chat") {
    std::vector<int32_t> tokens;
    if (!absl::GetFlag(FLAGS_tokens).empty()) {
      auto t = ParseTokens(absl::GetFlag(FLAGS_tokens));
      if (!t.ok()) {
        std::cerr << "moemesh: " << t.status().message() << "\n";
        return 2;
      }
      tokens = *t;
    }
    if (cmd == "generate" || cmd == "chat") {
      moemesh::cli::GenerateArgs g;
      g.prompt = absl::GetFlag(FLAGS_prompt);
      g.tokens = tokens;
      g.max_tokens = absl::GetFlag(FLAGS_max_tokens);
      g.sampling.temperature = static_cast<float>(absl::GetFlag(FLAGS_temperature));
      g.sampling.top_k = absl::GetFlag(FLAGS_sample_top_k);
      g.sampling.top_p = static_cast<float>(absl::GetFlag(FLAGS_top_p));
      g.sampling.seed = absl::GetFlag(FLAGS_seed);
      g.temperature_set = g.sampling.temperature >= 0;
      g.top_k_set = g.sampling.top_k >= 0;
      g.top_p_set = g.sampling.top_p >= 0;
      if (!g.temperature_set) g.sampling.temperature = 0;
      if (!g.top_k_set) g.sampling.top_k = 0;
      if (!g.top_p_set) g.sampling.top_p = 1;
      g.ignore_eos = absl::GetFlag(FLAGS_ignore_eos);
      auto stops = ParseStops(absl::GetFlag(FLAGS_stop));
      if (!stops.ok()) {
        std::cerr << "moemesh: " << stops.status().message() << "\n";
        return 2;
      }
      g.stop = *std::move(stops);
      if (!absl::GetFlag(FLAGS_chat).empty()) {
        auto m = moemesh::cli::ReadChatFile(absl::GetFlag(FLAGS_chat));
        if (!m.ok()) {
          std::cerr << "moemesh: " << m.status().message() << "\n";
          return 2;
        }
        g.messages = *std::move(m);
      }
      status = cmd == "chat" ? moemesh::cli::Chat(c, g) : moemesh::cli::Generate(c, g);
    } else {
      status = moemesh::cli::Score(c, tokens, absl::GetFlag(FLAGS_logprobs),
                                   absl::GetFlag(FLAGS_top_logprobs));
    }
  } else if (cmd == "up") {
    moemesh::cli::UpArgs u;
    u.groups = c.groups;
    u.replicas = absl::GetFlag(FLAGS_replicas);
    u.wire_dtype = absl::GetFlag(FLAGS_wire_dtype);
    u.worker_backend = absl::GetFlag(FLAGS_worker_backend);
    char exe[4096];
    const ssize_t len = ::readlink("/proc/self/exe", exe, sizeof(exe) - 1);
    std::string self = len > 0 ? std::string(exe, len) : std::string(argv[0]);
    u.bin_dir = self.substr(0, self.rfind('/'));
    const char* home = std::getenv("HOME");
    const char* cache = std::getenv("XDG_CACHE_HOME");
    u.default_model_dir = cache
                              ? absl::StrCat(cache, "/moemesh/default-model")
                              : absl::StrCat(home ? home : "/tmp", "/.cache/moemesh/default-model");
    u.address_file = absl::GetFlag(FLAGS_address_file);
    u.shared_in_gateway = absl::GetFlag(FLAGS_shared_in_gateway);
    u.http_port = absl::GetFlag(FLAGS_http_port);
    u.api_key_file = absl::GetFlag(FLAGS_api_key_file);
    u.chat_template = absl::GetFlag(FLAGS_chat_template);
    u.tls = absl::GetFlag(FLAGS_tls);
    u.kv_cache_bytes = absl::GetFlag(FLAGS_kv_cache_bytes);
    u.kv_cache_dtype = absl::GetFlag(FLAGS_kv_cache_dtype);
    u.micro_batches = absl::GetFlag(FLAGS_micro_batches);
    u.added_latency_us = absl::GetFlag(FLAGS_added_latency_us);
    u.gateway_cpus = absl::GetFlag(FLAGS_gateway_cpus);
    u.worker_cpus = absl::GetFlag(FLAGS_worker_cpus);
    const char* tmp = std::getenv("TMPDIR");
    u.run_dir = tmp ? tmp : "/tmp";
    status = moemesh::cli::Up(c, u);
  } else {
    std::cerr << "moemesh: unknown command '" << cmd << "'\n"
              << absl::ProgramUsageMessage() << "\n";
    return 2;
  }
  if (!status.ok()) {
    std::cerr << "moemesh " << cmd << ": " << status.message() << "\n";
    return status.code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
  }
  return 0;
}
