// moemesh: the command-line tool.
//
//   moemesh make-model --arch mixtral --out DIR [--vocab --hidden ... --dtype --seed]
//   moemesh generate  (--model DIR | --gateway ADDR) (--prompt TEXT | --tokens 1,2,3) --max-tokens N
//   moemesh score     (--model DIR | --gateway ADDR) --tokens 1,2,3
//   moemesh up        [--model DIR] --groups G [--replicas R]
#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "tools/cli/commands.h"

ABSL_FLAG(std::string, arch, "mixtral", "make-model: mixtral | deepseek_v3");
ABSL_FLAG(std::string, out, "", "make-model: output directory");
ABSL_FLAG(int, vocab, 512, "make-model: vocabulary size");
ABSL_FLAG(int, hidden, 256, "make-model: hidden size");
ABSL_FLAG(int, intermediate, 512, "make-model: expert FFN width");
ABSL_FLAG(int, layers, 4, "make-model: layers");
ABSL_FLAG(int, heads, 8, "make-model: attention heads");
ABSL_FLAG(int, kv_heads, 2, "make-model: key/value heads");
ABSL_FLAG(int, experts, 8, "make-model: routed experts per layer");
ABSL_FLAG(int, top_k, 0, "experts per token (make-model: written to config, default 2; "
                         "generate/score: overrides the config when > 0)");
ABSL_FLAG(std::string, dtype, "f32", "make-model: f32 | f16 | bf16");
ABSL_FLAG(uint64_t, seed, 0, "make-model: weight seed; generate: sampling seed");
ABSL_FLAG(int, shard_mb, 0, "make-model: write shards of about this many MiB (0: one file)");
ABSL_FLAG(int, max_position, 4096, "make-model: max_position_embeddings");

ABSL_FLAG(std::string, model, "", "model directory (Hugging Face layout)");
ABSL_FLAG(std::string, gateway, "", "generate/score through a running gateway at host:port");
ABSL_FLAG(std::string, prompt, "", "generate: prompt text");
ABSL_FLAG(std::string, tokens, "", "generate/score: comma-separated token ids");
ABSL_FLAG(int, max_tokens, 16, "generate: tokens to generate");
ABSL_FLAG(double, temperature, 0.0, "generate: 0 is greedy");
ABSL_FLAG(int, sample_top_k, 0, "generate: sample among the k most likely (0: all)");
ABSL_FLAG(double, top_p, 1.0, "generate: nucleus sampling mass");
ABSL_FLAG(bool, logprobs, false, "score: print log-probabilities instead of logits");
ABSL_FLAG(int, groups, 1, "generate/score in process: local expert groups; up: expert groups");
ABSL_FLAG(int, replicas, 1, "up: replicas per expert group");
ABSL_FLAG(std::string, wire_dtype, "f32", "up: activation dtype on the wire (f32 | bf16)");
ABSL_FLAG(double, timeout, 0, "generate/score via gateway: deadline in seconds (0: none)");

namespace {

absl::StatusOr<std::vector<int32_t>> ParseTokens(const std::string& s) {
  std::vector<int32_t> out;
  for (absl::string_view p : absl::StrSplit(s, ',', absl::SkipWhitespace())) {
    int32_t v;
    if (!absl::SimpleAtoi(p, &v)) return absl::InvalidArgumentError(absl::StrCat("bad token id '", p, "'"));
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
      "  score       print the logits of every position as JSON\n"
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
    m.vocab = absl::GetFlag(FLAGS_vocab);
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
    status = moemesh::cli::MakeModel(m);
  } else if (cmd == "generate" || cmd == "score") {
    std::vector<int32_t> tokens;
    if (!absl::GetFlag(FLAGS_tokens).empty()) {
      auto t = ParseTokens(absl::GetFlag(FLAGS_tokens));
      if (!t.ok()) {
        std::cerr << "moemesh: " << t.status().message() << "\n";
        return 2;
      }
      tokens = *t;
    }
    if (cmd == "generate") {
      moemesh::cli::GenerateArgs g;
      g.prompt = absl::GetFlag(FLAGS_prompt);
      g.tokens = tokens;
      g.max_tokens = absl::GetFlag(FLAGS_max_tokens);
      g.sampling.temperature = static_cast<float>(absl::GetFlag(FLAGS_temperature));
      g.sampling.top_k = absl::GetFlag(FLAGS_sample_top_k);
      g.sampling.top_p = static_cast<float>(absl::GetFlag(FLAGS_top_p));
      g.sampling.seed = absl::GetFlag(FLAGS_seed);
      status = moemesh::cli::Generate(c, g);
    } else {
      status = moemesh::cli::Score(c, tokens, absl::GetFlag(FLAGS_logprobs));
    }
  } else if (cmd == "up") {
    moemesh::cli::UpArgs u;
    u.groups = c.groups;
    u.replicas = absl::GetFlag(FLAGS_replicas);
    u.wire_dtype = absl::GetFlag(FLAGS_wire_dtype);
    u.program = argv[0];
    status = moemesh::cli::Up(c, u);
  } else {
    std::cerr << "moemesh: unknown command '" << cmd << "'\n" << absl::ProgramUsageMessage() << "\n";
    return 2;
  }
  if (!status.ok()) {
    std::cerr << "moemesh " << cmd << ": " << status.message() << "\n";
    return status.code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
  }
  return 0;
}
