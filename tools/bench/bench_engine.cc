// bench_engine: prefill and decode throughput of the single-process engine.
//
//   bench_engine [--model DIR] [--prompt 512] [--decode 64] [--json out.json]
//
// Without --model it generates the benchmark model (hidden 1024, 8 layers, 16 heads,
// 4 kv heads, 8 experts top-2, intermediate 2816, vocab 32000, F32; about 640M parameters)
// into --cache_dir once and reuses it. Prints a table and writes JSON.
#include <sys/stat.h>

#include <cstdio>
#include <fstream>
#include <iostream>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "nlohmann/json.hpp"
#include "services/engine/inproc.h"
#include "services/engine/sampler.h"
#include "services/model/generator.h"

ABSL_FLAG(std::string, model, "", "model directory (default: generate the benchmark model)");
ABSL_FLAG(std::string, cache_dir, "/tmp/moemesh-bench-model", "where the benchmark model is kept");
ABSL_FLAG(int, prompt, 512, "prompt tokens for prefill");
ABSL_FLAG(int, decode, 64, "tokens to decode");
ABSL_FLAG(int, repeats, 2, "prefill repetitions (best is reported)");
ABSL_FLAG(std::string, json, "", "write results as JSON here");

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  using namespace moemesh;
  std::string dir = absl::GetFlag(FLAGS_model);
  if (dir.empty()) {
    dir = absl::GetFlag(FLAGS_cache_dir);
    struct stat st;
    if (::stat((dir + "/config.json").c_str(), &st) != 0) {
      GeneratorOptions o;
      o.config = SmallMixtralConfig(32000, 1024, 2816, 8, 16, 4, 8, 2);
      o.seed = 1;
      std::fprintf(stderr, "generating the benchmark model in %s ...\n", dir.c_str());
      if (auto s = GenerateModel(o, dir); !s.ok()) {
        std::fprintf(stderr, "%s\n", s.ToString().c_str());
        return 1;
      }
    }
  }
  const absl::Time t0 = absl::Now();
  auto m = InprocModel::Load(dir);
  if (!m.ok()) {
    std::fprintf(stderr, "%s\n", m.status().ToString().c_str());
    return 1;
  }
  const double load_s = absl::ToDoubleSeconds(absl::Now() - t0);
  Engine& e = *(*m)->engine;
  const ModelConfig& cfg = e.config();
  const int np = absl::GetFlag(FLAGS_prompt), nd = absl::GetFlag(FLAGS_decode);
  std::vector<int32_t> prompt(np);
  for (int i = 0; i < np; ++i) prompt[i] = (i * 7919 + 13) % cfg.vocab_size;

  double best_prefill = 1e30, decode_s = 0;
  for (int rep = 0; rep < absl::GetFlag(FLAGS_repeats); ++rep) {
    auto seq = e.NewSequence();
    StepInput in{seq.get(), prompt, false};
    const absl::Time a = absl::Now();
    auto r = e.Step({&in, 1});
    const double s = absl::ToDoubleSeconds(absl::Now() - a);
    if (!r.ok()) {
      std::fprintf(stderr, "%s\n", r.status().ToString().c_str());
      return 1;
    }
    best_prefill = std::min(best_prefill, s);
    if (rep == 0) {
      int32_t tok = Argmax((*r)[0].span());
      const absl::Time d = absl::Now();
      for (int i = 0; i < nd; ++i) {
        StepInput di{seq.get(), absl::Span<const int32_t>(&tok, 1), false};
        auto dr = e.Step({&di, 1});
        if (!dr.ok()) return 1;
        tok = Argmax((*dr)[0].span());
      }
      decode_s = absl::ToDoubleSeconds(absl::Now() - d);
    }
  }
  const double prefill_tps = np / best_prefill, decode_tps = nd / decode_s;
  std::printf("| model | params | prompt | prefill tok/s | decode tok/s | load s |\n");
  std::printf("|---|---|---|---|---|---|\n");
  const double params =
      static_cast<double>(cfg.vocab_size) * cfg.hidden_size * 2 +
      cfg.num_layers * (static_cast<double>(cfg.hidden_size) * cfg.num_heads * cfg.head_dim * 2 +
                        2.0 * cfg.hidden_size * cfg.num_kv_heads * cfg.head_dim +
                        3.0 * cfg.num_experts * cfg.hidden_size * cfg.moe_intermediate_size +
                        cfg.num_experts * cfg.hidden_size);
  std::printf("| %s | %.0fM | %d | %.1f | %.2f | %.1f |\n", dir.c_str(), params / 1e6, np,
              prefill_tps, decode_tps, load_s);
  if (!absl::GetFlag(FLAGS_json).empty()) {
    nlohmann::json j = {{"model", dir},
                        {"params", params},
                        {"prompt_tokens", np},
                        {"decode_tokens", nd},
                        {"prefill_tokens_per_s", prefill_tps},
                        {"decode_tokens_per_s", decode_tps},
                        {"load_s", load_s}};
    std::ofstream(absl::GetFlag(FLAGS_json)) << j.dump(2) << "\n";
  }
  return 0;
}
