// The commands of the moemesh tool, callable without flags (main.cc fills the structs).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"
#include "services/engine/sampler.h"

namespace moemesh::cli {

struct Common {
  std::string model;    // in-process model directory
  std::string gateway;  // or a gateway address
  int top_k = 0;
  int groups = 1;
  double timeout_s = 0;
};

struct MakeModelArgs {
  std::string arch, out, dtype;
  int vocab, hidden, intermediate, layers, heads, kv_heads, experts, top_k, shard_mb, max_position;
  uint64_t seed;
  double rope_theta = 10000.0;
  // --arch deepseek_v3 only.
  int moe_intermediate = 0;  // 0: intermediate / 4
  int shared_experts = 1, dense_layers = 1, moe_layer_freq = 1, n_group = 4, topk_group = 2;
  std::string topk_method = "noaux_tc", scoring = "sigmoid";
  bool norm_topk_prob = true;
  double routed_scaling = 2.5;
  int q_lora_rank = 128, kv_lora_rank = 64, qk_nope_dim = 32, qk_rope_dim = 16, v_head_dim = 32;
  double rope_factor = 0.0;  // 0: no YaRN
  int rope_original_max = 0;
  double rope_beta_fast = 32.0, rope_beta_slow = 1.0, rope_mscale = 1.0, rope_mscale_all_dim = 1.0;
  int mtp_layers = 0;
  // Copy the tokenizer files of this directory into the model; the vocabulary grows to the
  // tokenizer's size unless `vocab_given` (then it must be at least that size).
  std::string tokenizer_from;
  bool vocab_given = false;
};

struct GenerateArgs {
  std::string prompt;
  std::vector<int32_t> tokens;
  nlohmann::ordered_json messages;  // a chat (JSON array of {"role","content"}), or null
  int max_tokens = 16;
  SamplingParams sampling;
  // Unset sampling fields take the model's generation_config.json defaults.
  bool temperature_set = false, top_k_set = false, top_p_set = false;
  std::vector<std::string> stop;  // stop strings
  bool ignore_eos = false;
};

struct TokenizeArgs {
  std::string prompt;
  nlohmann::ordered_json messages;  // a chat, or null
  bool add_special_tokens = true;
};

struct UpArgs {
  int groups = 1;
  int replicas = 1;
  std::string wire_dtype = "bf16";
  std::string worker_backend = "cpu";  // the expert workers' --backend (cpu | cuda)
  std::string bin_dir;                 // where the service binaries are
  std::string default_model_dir;       // used (and created) when --model is not given
  std::string run_dir = "/tmp";        // logs and port files go under it
  std::string address_file;            // when set, the gateway address is written here
  bool shared_in_gateway = true;       // DeepSeek shared experts in the gateway, not a worker group
  int http_port = -1;                  // the gateway's OpenAI-compatible HTTP API (-1: off, 0: any)
  std::string api_key_file;            // passed to the gateway
  std::string chat_template;           // passed to the gateway
  bool tls = false;                    // a throwaway CA and mTLS between every service
  int64_t kv_cache_bytes = -1;         // the gateway's KV cache bound (-1: its default)
  std::string kv_cache_dtype;          // f32 | bf16 (empty: the gateway's default)
  int micro_batches = 1;               // the gateway's --micro_batches (2: ping-pong overlap)
  int64_t added_latency_us = 0;        // one-way delay on every hop inside the mesh (testbed)
  std::string gateway_cpus, worker_cpus;  // pin gateway+router and workers (empty: unpinned)
};

absl::Status MakeModel(const MakeModelArgs& a);
absl::Status Generate(const Common& c, const GenerateArgs& a);
// Prints the logits (or log-probabilities) of every position as JSON; with top_logprobs > 0,
// instead the top_logprobs most likely next tokens per position and the log-probability of
// each given next token.
absl::Status Score(const Common& c, const std::vector<int32_t>& tokens, bool logprobs,
                   int top_logprobs = 0);
// Prints {"ids":[…]} for a text or for a chat (template applied with the generation prompt).
absl::Status Tokenize(const Common& c, const TokenizeArgs& a);
// Prints {"text":…}.
absl::Status Detokenize(const Common& c, const std::vector<int32_t>& ids, bool skip_special_tokens);
// Answers a chat: with a.messages, once; without, as a conversation read line by line from
// standard input (each line a user message) until end of input.
absl::Status Chat(const Common& c, const GenerateArgs& a);
// Reads a chat file: a JSON array of {"role","content"} messages.
absl::StatusOr<nlohmann::ordered_json> ReadChatFile(const std::string& path);
absl::Status Up(const Common& c, const UpArgs& a);
// The JSON of a top-k score: {"tokens", "token_logprobs", "top": [{"ids", "logprobs"}]}.
void PrintTopLogProbs(const std::vector<int32_t>& tokens,
                      const std::vector<std::vector<int32_t>>& top_ids,
                      const std::vector<std::vector<float>>& top_log_probs,
                      const std::vector<float>& token_log_probs);

// Through a gateway (remote.cc). Generation prints the text (or ids) as it streams and returns
// the generated text.
absl::StatusOr<std::string> GenerateViaGateway(const Common& c, const GenerateArgs& a);
absl::Status ScoreViaGateway(const Common& c, const std::vector<int32_t>& tokens, bool logprobs,
                             int top_logprobs);
absl::Status TokenizeViaGateway(const Common& c, const TokenizeArgs& a);
absl::Status DetokenizeViaGateway(const Common& c, const std::vector<int32_t>& ids,
                                  bool skip_special_tokens);

}  // namespace moemesh::cli
