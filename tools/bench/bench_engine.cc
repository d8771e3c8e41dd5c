// bench_engine: prefill and batched decode throughput of the single-process engine.
//
//   bench_engine [--model DIR] [--prompt 512] [--concurrency 1,4,8,16] [--decode 64]
//                [--json out.json] [--weights_dtype checkpoint|f32|bf16|f16]
//                [--threads N] [--blas_min_rows R] [--isa avx512|avx2|scalar]
//
// Prefill: one --prompt-token prompt in one step (best of --repeats). Decode: for each
// concurrency C, C greedy streams with 16-token prompts (prefilled first, untimed) decode
// --decode tokens each, all C in every step; the figure is C × decode tokens over the decode
// phase. --prompts says whose workload: `shared` (the default) gives every stream the same
// prompt, so the C streams decode the same tokens and every step routes all C rows to the same
// experts; that is what llama-batched-bench, the reference, measures (it feeds token 0
// to every stream at every position). `distinct` gives each stream a prompt of its own, as in
// serving: C rows then spread over more experts and a step reads more weights (at 16 streams,
// nearly every expert of the benchmark model). Without --model it generates the benchmark
// model (hidden 1024, 8 layers, 16 heads, 4 kv heads, 8 experts top-2, intermediate 2816, vocab
// 32000; about 640M parameters) in --model_dtype into --cache_dir once and reuses it. Prints a
// table and writes JSON with exactly the keys
//   {"prefill_tokens_per_s", "decode": [{"streams", "tokens_per_s"}], "weight_bytes",
//    "peak_rss_bytes"}.
#include <sys/resource.h>
#include <sys/stat.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <string>
#include <utility>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "nlohmann/json.hpp"
#include "services/compute/cpu/kernel_threads.h"
#include "services/compute/cpu/matmul.h"
#include "services/engine/inproc.h"
#include "services/engine/kv_cache.h"
#include "services/engine/sampler.h"
#include "services/model/generator.h"
#include "tools/bench/streaming.h"

ABSL_FLAG(std::string, model, "", "model directory (default: generate the benchmark model)");
ABSL_FLAG(std::string, cache_dir, "/tmp/moemesh-bench-model", "where the benchmark model is kept");
ABSL_FLAG(std::string, model_dtype, "f32",
          "dtype of a generated benchmark model: f32 | bf16 | f16 | fp8");
ABSL_FLAG(int, prompt, 512, "prompt tokens for prefill");
ABSL_FLAG(std::string, concurrency, "1,4,8,16", "decode streams to measure, comma-separated");
ABSL_FLAG(int, decode, 64, "tokens to decode per stream");
ABSL_FLAG(int, repeats, 2, "prefill repetitions (best is reported)");
ABSL_FLAG(std::string, weights_dtype, "checkpoint", "checkpoint | f32 | bf16 | f16");
ABSL_FLAG(int, threads, 0, "kernel threads (0: all cores)");
ABSL_FLAG(int, blas_min_rows, 0,
          "rows from which products go to OpenBLAS (0: never; keeps batch invariance)");
ABSL_FLAG(std::string, isa, "", "force the kernels' instruction set: avx512 | avx2 | scalar");
ABSL_FLAG(std::string, json, "", "write results as JSON here");
ABSL_FLAG(std::string, kv_cache_dtype, "f32", "KV cache dtype: f32 | bf16");
ABSL_FLAG(std::string, prompts, "shared",
          "decode streams' prompts: shared (every stream the same prompt: every stream routes to "
          "the same experts, as in llama-batched-bench) | distinct (each stream its own)");

namespace {

using namespace moemesh;

// A phase's mean step time and its stages (ms), from two snapshots of the engine's profile.
struct StageShare {
  double step_ms = 0, attention_ms = 0, moe_ms = 0, dense_ffn_ms = 0, lm_head_ms = 0, other_ms = 0;
};

StageShare Share(const StepProfile& a, const StepProfile& b) {
  StageShare s;
  const double steps = static_cast<double>(b.steps - a.steps);
  if (steps <= 0) return s;
  auto ms = [steps](double x) { return x / steps * 1e3; };
  s.step_ms = ms(b.wall_s - a.wall_s);
  s.attention_ms = ms(b.attention_s - a.attention_s);
  // In process the MoE layer computes inside the call; a wait only with an asynchronous one.
  s.moe_ms = ms(b.moe_call_s - a.moe_call_s + b.moe_wait_s - a.moe_wait_s);
  s.dense_ffn_ms = ms(b.dense_ffn_s - a.dense_ffn_s);
  s.lm_head_ms = ms(b.lm_head_s - a.lm_head_s);
  s.other_ms = ms(b.other_s() - a.other_s());
  return s;
}

// This machine's streaming bandwidth, GB/s: the best of a plain read on the kernel threads and
// the decode kernel (cpu::MatMul, one row) over 8 distinct 2816 × 1024 F32 matrices (92 MB, more
// than a last-level cache, so every pass streams from memory), three passes each. Run before the
// model loads, so that its buffers do not add to the peak RSS reported for the model.
double StreamingGbps() {
  constexpr int kMatrices = 8;
  constexpr int64_t kRows = 2816, kCols = 1024;
  return std::max(bench::ReadGbps(kMatrices, kRows * kCols),
                  bench::KernelGbps(DType::kF32, kRows, kCols, kMatrices, kMatrices));
}

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "%s\n", s.ToString().c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  if (absl::GetFlag(FLAGS_threads) > 0)
    cpu::KernelThreads::SetThreads(absl::GetFlag(FLAGS_threads));
  cpu::set_blas_min_rows(absl::GetFlag(FLAGS_blas_min_rows));
  const std::string isa = absl::GetFlag(FLAGS_isa);
  if (isa == "scalar") cpu::SetIsa(cpu::Isa::kScalar);
  if (isa == "avx2") cpu::SetIsa(cpu::Isa::kAvx2);
  if (isa == "avx512") cpu::SetIsa(cpu::Isa::kAvx512);
  std::vector<int> streams;
  for (absl::string_view p :
       absl::StrSplit(absl::GetFlag(FLAGS_concurrency), ',', absl::SkipEmpty())) {
    int c;
    if (!absl::SimpleAtoi(p, &c) || c < 1)
      return Fail(absl::InvalidArgumentError("bad --concurrency"));
    streams.push_back(c);
  }
  const std::string prompts_flag = absl::GetFlag(FLAGS_prompts);
  if (prompts_flag != "distinct" && prompts_flag != "shared") {
    return Fail(absl::InvalidArgumentError("--prompts must be distinct or shared"));
  }
  const bool shared = prompts_flag == "shared";
  std::string dir = absl::GetFlag(FLAGS_model);
  if (dir.empty()) {
    const std::string md = absl::GetFlag(FLAGS_model_dtype);
    dir = absl::GetFlag(FLAGS_cache_dir) + (md == "f32" ? "" : "-" + md);
    struct stat st;
    if (::stat((dir + "/config.json").c_str(), &st) != 0) {
      GeneratorOptions o;
      o.config = SmallMixtralConfig(32000, 1024, 2816, 8, 16, 4, 8, 2);
      o.seed = 1;
      if (md == "bf16") o.dtype = DType::kBF16;
      if (md == "f16") o.dtype = DType::kF16;
      if (md == "fp8") o.dtype = DType::kF8E4M3;
      std::fprintf(stderr, "generating the benchmark model in %s ...\n", dir.c_str());
      if (auto s = GenerateModel(o, dir); !s.ok()) return Fail(s);
    }
  }
  const double streaming_gbps = StreamingGbps();
  auto wd = ParseWeightsDType(absl::GetFlag(FLAGS_weights_dtype));
  if (!wd.ok()) return Fail(wd.status());
  InprocOptions io;
  io.weights_dtype = *wd;
  const absl::Time t0 = absl::Now();
  auto m = InprocModel::Load(dir, io);
  if (!m.ok()) return Fail(m.status());
  const double load_s = absl::ToDoubleSeconds(absl::Now() - t0);
  Engine& e = *(*m)->engine;
  auto kvd = ParseKvCacheDType(absl::GetFlag(FLAGS_kv_cache_dtype));
  if (!kvd.ok()) return Fail(kvd.status());
  if (auto s = e.ConfigureKvCache({.dtype = *kvd}); !s.ok()) return Fail(s);
  const ModelConfig& cfg = e.config();
  const int np = absl::GetFlag(FLAGS_prompt), nd = absl::GetFlag(FLAGS_decode);
  std::vector<int32_t> prompt(np);
  for (int i = 0; i < np; ++i) prompt[i] = (i * 7919 + 13) % cfg.vocab_size;

  // Where each phase's step time went (the engine's StepProfile, per step).
  std::vector<std::pair<std::string, StageShare>> stages;
  double best_prefill = 1e30;
  for (int rep = 0; rep < absl::GetFlag(FLAGS_repeats); ++rep) {
    auto seq = e.NewSequence();
    StepInput in{seq.get(), prompt, false};
    const StepProfile before = e.profile();
    const absl::Time a = absl::Now();
    auto r = e.Step({&in, 1});
    if (!r.ok()) return Fail(r.status());
    const double s = absl::ToDoubleSeconds(absl::Now() - a);
    if (s < best_prefill) {
      best_prefill = s;
      if (stages.empty()) stages.emplace_back();
      stages[0] = {absl::StrCat("prefill ", np), Share(before, e.profile())};
    }
  }
  const double prefill_tps = np / best_prefill;

  nlohmann::json decode = nlohmann::json::array();
  // What each decode phase's steps read from memory, against the streaming bandwidth.
  struct Traffic {
    std::string phase;
    double dense_mb = 0, expert_mb = 0, kv_mb = 0, experts_per_layer = 0, step_ms = 0;
  };
  std::vector<Traffic> traffic;
  const double kv_row_bytes = static_cast<double>(e.cache_floats_per_token_per_layer()) *
                              cfg.num_layers * (*kvd == DType::kBF16 ? 2 : 4);
  int moe_layers = 0;
  for (int l = 0; l < cfg.num_layers; ++l) moe_layers += cfg.IsMoeLayer(l) ? 1 : 0;
  std::vector<double> decode_tps;
  for (int c : streams) {
    std::vector<std::unique_ptr<Sequence>> seqs;
    std::vector<std::vector<int32_t>> prompts(c);
    std::vector<StepInput> ins;
    for (int s = 0; s < c; ++s) {
      seqs.push_back(e.NewSequence());
      for (int i = 0; i < 16; ++i)
        prompts[s].push_back(((shared ? 0 : s) * 104729 + i * 7919 + 17) % cfg.vocab_size);
      ins.push_back(StepInput{seqs.back().get(), prompts[s], false});
    }
    auto r = e.Step(ins);
    if (!r.ok()) return Fail(r.status());
    std::vector<int32_t> tok(c);
    for (int s = 0; s < c; ++s) tok[s] = Argmax((*r)[s].span());
    const StepProfile before = e.profile();
    const LocalExpertGroup::RunCounters experts_before = (*m)->expert_counters();
    double kv_bytes = 0;  // the KV cache each step reads: every cached position of every stream
    const absl::Time d = absl::Now();
    for (int i = 0; i < nd; ++i) {
      for (int s = 0; s < c; ++s) kv_bytes += static_cast<double>(seqs[s]->length()) * kv_row_bytes;
      for (int s = 0; s < c; ++s) {
        ins[s] = StepInput{seqs[s].get(), absl::Span<const int32_t>(&tok[s], 1), false};
      }
      auto dr = e.Step(ins);
      if (!dr.ok()) return Fail(dr.status());
      for (int s = 0; s < c; ++s) tok[s] = Argmax((*dr)[s].span());
    }
    const double tps = static_cast<double>(c) * nd / absl::ToDoubleSeconds(absl::Now() - d);
    stages.emplace_back(absl::StrCat("decode, ", c, c == 1 ? " stream" : " streams"),
                        Share(before, e.profile()));
    const LocalExpertGroup::RunCounters experts_after = (*m)->expert_counters();
    Traffic tr;
    tr.phase = stages.back().first;
    tr.dense_mb = static_cast<double>(e.dense_bytes_per_step() + (*m)->moe->gate_bytes()) / 1e6;
    tr.expert_mb =
        static_cast<double>(experts_after.weight_bytes_read - experts_before.weight_bytes_read) /
        nd / 1e6;
    tr.experts_per_layer =
        static_cast<double>(experts_after.expert_runs - experts_before.expert_runs) / nd /
        std::max(1, moe_layers);
    tr.kv_mb = kv_bytes / nd / 1e6;
    tr.step_ms = stages.back().second.step_ms;
    traffic.push_back(tr);
    decode_tps.push_back(tps);
    decode.push_back({{"streams", c}, {"tokens_per_s", tps}});
  }
  struct rusage ru;
  ::getrusage(RUSAGE_SELF, &ru);
  const int64_t peak_rss = static_cast<int64_t>(ru.ru_maxrss) * 1024;
  const int64_t weight_bytes = (*m)->weight_bytes();

  std::printf(
      "model %s, weights %.1f MB, peak RSS %.1f MB, load %.1f s, isa %s, %d threads, decode "
      "streams' prompts %s\n",
      dir.c_str(), weight_bytes / 1e6, peak_rss / 1e6, load_s, cpu::IsaName(cpu::ActiveIsa()),
      cpu::KernelThreads::Get().threads(), prompts_flag.c_str());
  std::printf("| prefill %d tok/s |", np);
  for (int c : streams) std::printf(" decode %d streams tok/s |", c);
  std::printf("\n|---|");
  for (size_t i = 0; i < streams.size(); ++i) std::printf("---|");
  std::printf("\n| %.1f |", prefill_tps);
  for (double t : decode_tps) std::printf(" %.1f |", t);
  std::printf("\n");
  std::printf(
      "\nper step, ms (share): attention = norm, Q/K/V/O products, RoPE, attention; MoE = "
      "norm, gating, experts; other = embedding, bookkeeping, merging\n\n"
      "| phase | step ms | attention | MoE | dense FFN | LM head | other |\n"
      "|---|---|---|---|---|---|---|\n");
  for (const auto& [name, st] : stages) {
    std::printf("| %s | %.2f |", name.c_str(), st.step_ms);
    for (double v : {st.attention_ms, st.moe_ms, st.dense_ffn_ms, st.lm_head_ms, st.other_ms}) {
      std::printf(" %.2f (%.0f %%) |", v, st.step_ms > 0 ? 100.0 * v / st.step_ms : 0.0);
    }
    std::printf("\n");
  }
  std::printf(
      "\ndecode traffic per step: weights read (dense layers, LM head and gates; the experts "
      "the step's tokens routed to, each read once per step) and the KV cache; GB/s = MB / step "
      "ms; streaming bandwidth measured before the model loaded: %.1f GB/s (best of a plain "
      "read and the one-row kernel over 92 MB)\n\n"
      "| phase | experts per MoE layer | dense MB | experts MB | KV MB | step ms | GB/s | "
      "of streaming |\n|---|---|---|---|---|---|---|---|\n",
      streaming_gbps);
  for (const Traffic& t : traffic) {
    const double mb = t.dense_mb + t.expert_mb + t.kv_mb;
    const double gbps = t.step_ms > 0 ? mb / t.step_ms : 0;
    std::printf("| %s | %.2f | %.1f | %.1f | %.1f | %.2f | %.1f | %.0f %% |\n", t.phase.c_str(),
                t.experts_per_layer, t.dense_mb, t.expert_mb, t.kv_mb, t.step_ms, gbps,
                streaming_gbps > 0 ? 100.0 * gbps / streaming_gbps : 0.0);
  }
  if (!absl::GetFlag(FLAGS_json).empty()) {
    nlohmann::json j = {{"prefill_tokens_per_s", prefill_tps},
                        {"decode", decode},
                        {"weight_bytes", weight_bytes},
                        {"peak_rss_bytes", peak_rss}};
    std::ofstream(absl::GetFlag(FLAGS_json)) << j.dump() << "\n";
  }
  return 0;
}
