// bench_mesh: prefill latency and decode throughput of a whole mesh on loopback, next to the
// single-process engine on the same checkpoint.
//
//   bench_mesh [--model DIR | --small] [--groups 2] [--replicas 1] [--wire_dtype f32|bf16]
//              [--prompt 512] [--decode 64] [--concurrency 1,4,8,16] [--json out.json]
//
// Without --model it uses bench_engine's benchmark model (hidden 1024, 8 layers, 8 experts
// top-2, vocab 32000, F32, ~640M parameters), generating it into --cache_dir once; --small
// uses a ~110M-parameter model (hidden 512, 4 layers) instead. Mesh::Start runs the gateway,
// the router and groups × replicas expert workers as separate processes on loopback (binaries
// from --bin_dir, by default this program's own directory). Every process shares this
// machine's cores, so on a small machine the numbers measure CPU contention as much as the
// network; say so when quoting them.
//
// What it measures:
//   prefill  a --prompt-token Score through the gateway (its response carries the full
//            [prompt, vocab] F32 logits), and the time to the first token of a --prompt-token
//            Generate with max_tokens 1 (prefill plus one LM-head row); best of --repeats.
//            The gateway runs with --max_step_tokens = --prompt so that the prompt is one
//            step, as in bench_engine.
//   decode   C concurrent greedy streams (C from --concurrency) of --decode tokens each, from
//            --decode_prompt-token prompts (--prompts shared, the default: the same prompt for
//            every stream, as bench_engine; distinct: one each): aggregate tokens/s (all tokens /
//            wall), mean inter-token latency within a stream, mean time to first token, and the
//            mean tokens per engine step (router Forward calls per MoE layer, from its /metrics).
//            With shared prompts a 256-token blocker request goes first, so that every stream
//            is admitted in the same step and they decode in lockstep as the single process's
//            do (its prefill counts in TTFT and the aggregate, not in the decode phase).
//   in-process  the same prefill step and a concurrency-1 decode with InprocModel (the
//            single-process engine), before the mesh starts; its greedy tokens are compared
//            with the mesh's.
//   wire     bytes per token per MoE layer: the serialized sizes of real ForwardRequest /
//            RunExpertsRequest messages (and their responses) per token, times the measured
//            (token, group) sends per token from the router's metrics.
// Prints markdown tables and writes --json.
//
// The testbed (issue 12, docs/SCALE-OUT.md): with --added_latency_us L1,L2,... it instead runs,
// for each latency and each --micro_batches setting, the mesh behind delaying proxies on every
// hop (services/net/delay_proxy.h), optionally pinned (--pin: gateway and router on CPU 0, the
// workers on CPU 1, one kernel thread and one BLAS thread per process), and drives
// --streams concurrent streams of --prompt-token prompts and --decode tokens each. It reports,
// per setting and per engine step, the gateway's busy time (its engine thread computing:
// attention, norms, LM head), its idle time, the workers' busy time (inside expert FFNs,
// summed over workers) and idle time, and R = step - G - E (network, queueing, router), then
// the bound (G+E+R)/max(G, E, (G+E)/2+R) from the one-micro-batch profile and the share of it
// that two micro-batches captured. --balanced uses a generated model whose gateway and worker
// busy times are close (hidden 512, 8 heads, 8 KV heads, 4 layers, 8 experts of 640, top-2;
// --balanced_layers, --balanced_inter, --balanced_experts and --balanced_top_k change them).
//
//   bench_mesh --balanced --balanced_layers 8 --balanced_inter 640
//              --added_latency_us 0,250,1000 --pin --micro_batches 1,2
//              --streams 16 --prompt 512 --decode 32 --groups 1 --repeats 2   (one command line;
//              the issue 12 testbed of docs/SCALE-OUT.md, session 7)
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <map>
#include <optional>
#include <sstream>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/barrier.h"
#include "absl/time/clock.h"
#include "moemesh/v1/expert_worker.pb.h"
#include "moemesh/v1/gateway.grpc.pb.h"
#include "moemesh/v1/router.pb.h"
#include "nlohmann/json.hpp"
#include "services/engine/inproc.h"
#include "services/engine/sampler.h"
#include "services/mesh/launcher.h"
#include "services/model/config.h"
#include "services/model/generator.h"
#include "services/rpc/server_host.h"
#include "services/rpc/tensor_proto.h"

ABSL_FLAG(std::string, model, "", "model directory (default: generate the benchmark model)");
ABSL_FLAG(std::string, cache_dir, "",
          "where a generated model is kept (default "
          "/tmp/moemesh-bench-model, or /tmp/moemesh-bench-model-small with --small)");
ABSL_FLAG(std::string, model_dtype, "f32",
          "dtype of a generated model's weights: f32 | bf16 (the cache directory gets a -bf16 "
          "suffix)");
ABSL_FLAG(bool, small, false, "use a smaller generated model (hidden 512, 4 layers, vocab 32000)");
ABSL_FLAG(int, groups, 2, "expert groups");
ABSL_FLAG(int, replicas, 1, "replicas per group");
ABSL_FLAG(std::string, wire_dtype, "bf16", "activation dtype on the wire: f32 | bf16");
ABSL_FLAG(int, prompt, 512, "prompt tokens for prefill");
ABSL_FLAG(int, decode, 64, "tokens each decode stream generates");
ABSL_FLAG(int, decode_prompt, 16, "prompt tokens of each decode stream");
ABSL_FLAG(std::string, concurrency, "1,4,8,16", "concurrent decode streams, comma separated");
ABSL_FLAG(std::string, prompts, "shared",
          "decode streams' prompts: shared (every stream the same prompt, as bench_engine's "
          "default and llama-batched-bench) | distinct (each stream its own)");
ABSL_FLAG(int, repeats, 2, "prefill repetitions (best is reported)");
ABSL_FLAG(bool, inproc, true, "also measure the single-process engine");
ABSL_FLAG(std::string, bin_dir, "", "directory of the moemesh service binaries (default: ours)");
ABSL_FLAG(std::string, work_dir, "", "logs and port files (default: a new /tmp/bench_mesh.*)");
ABSL_FLAG(int, blas_threads, 0, "OPENBLAS_NUM_THREADS for the mesh processes (0: inherit)");
ABSL_FLAG(int, worker_kernel_threads, 0,
          "--kernel_threads of each expert worker (0: the launcher's default, 2 x CPUs / groups "
          "each, at most every CPU)");
ABSL_FLAG(std::string, json, "", "write results as JSON here");
ABSL_FLAG(bool, balanced, false,
          "use a generated model whose gateway and worker busy times are close (testbed)");
ABSL_FLAG(int, balanced_inter, 640,
          "expert intermediate size of the --balanced model (larger: more expert work per token)");
ABSL_FLAG(int, balanced_experts, 8,
          "routed experts per layer of the --balanced model (more, smaller experts with a larger "
          "--balanced_top_k: DeepSeek's fine-grained layout, where the two halves of a split "
          "decode step share fewer experts)");
ABSL_FLAG(int, balanced_top_k, 2, "experts per token of the --balanced model");
ABSL_FLAG(int, balanced_layers, 4,
          "layers of the --balanced model (more layers: a smaller share of each step is the "
          "pipeline's fill and drain, which two micro-batches cannot overlap)");
ABSL_FLAG(std::string, added_latency_us, "",
          "testbed: one-way latencies added on every mesh hop, comma separated (runs the testbed "
          "instead of the prefill/decode tables)");
ABSL_FLAG(std::string, micro_batches, "1,2", "testbed: gateway micro-batch settings to compare");
ABSL_FLAG(bool, pin, false,
          "testbed: gateway+router on --gateway_cpus, workers on --worker_cpus, one kernel thread "
          "and one BLAS thread each");
ABSL_FLAG(std::string, gateway_cpus, "0", "testbed with --pin: CPUs of the gateway and router");
ABSL_FLAG(std::string, worker_cpus, "1", "testbed with --pin: CPUs of the expert workers");
ABSL_FLAG(int, streams, 16, "testbed: concurrent streams");

namespace moemesh {
namespace {

struct Options {
  std::string model, cache_dir, wire, bin_dir, work_dir, json, model_dtype = "f32";
  bool small = false, inproc = true, shared_prompts = true;
  int groups = 2, replicas = 1, prompt = 512, decode = 64, decode_prompt = 16, repeats = 2;
  int blas_threads = 0, worker_kernel_threads = 0;
  std::vector<int> concurrency;
  bool balanced = false, pin = false;
  std::vector<int> latencies_us, micro_batches;
  std::string gateway_cpus, worker_cpus;
  int streams = 16;
};

absl::StatusOr<std::vector<int>> IntList(const std::string& flag, const std::string& text,
                                         int min) {
  std::vector<int> out;
  for (absl::string_view c : absl::StrSplit(text, ',', absl::SkipWhitespace())) {
    int n = 0;
    if (!absl::SimpleAtoi(c, &n) || n < min)
      return absl::InvalidArgumentError(absl::StrCat("bad --", flag, " entry '", c, "'"));
    out.push_back(n);
  }
  return out;
}

absl::StatusOr<Options> GetOptions() {
  Options o;
  o.model = absl::GetFlag(FLAGS_model);
  o.small = absl::GetFlag(FLAGS_small);
  o.cache_dir = absl::GetFlag(FLAGS_cache_dir);
  if (o.cache_dir.empty())
    o.cache_dir = o.small ? "/tmp/moemesh-bench-model-small" : "/tmp/moemesh-bench-model";
  o.groups = absl::GetFlag(FLAGS_groups);
  o.replicas = absl::GetFlag(FLAGS_replicas);
  o.wire = absl::GetFlag(FLAGS_wire_dtype);
  o.prompt = absl::GetFlag(FLAGS_prompt);
  o.decode = absl::GetFlag(FLAGS_decode);
  o.decode_prompt = absl::GetFlag(FLAGS_decode_prompt);
  const std::string prompts = absl::GetFlag(FLAGS_prompts);
  if (prompts != "shared" && prompts != "distinct")
    return absl::InvalidArgumentError("--prompts must be shared or distinct");
  o.shared_prompts = prompts == "shared";
  o.repeats = absl::GetFlag(FLAGS_repeats);
  o.inproc = absl::GetFlag(FLAGS_inproc);
  o.bin_dir = absl::GetFlag(FLAGS_bin_dir);
  o.work_dir = absl::GetFlag(FLAGS_work_dir);
  o.blas_threads = absl::GetFlag(FLAGS_blas_threads);
  o.worker_kernel_threads = absl::GetFlag(FLAGS_worker_kernel_threads);
  if (o.worker_kernel_threads < 0) return absl::InvalidArgumentError("bad --worker_kernel_threads");
  o.json = absl::GetFlag(FLAGS_json);
  for (absl::string_view c :
       absl::StrSplit(absl::GetFlag(FLAGS_concurrency), ',', absl::SkipWhitespace())) {
    int n = 0;
    if (!absl::SimpleAtoi(c, &n) || n < 1)
      return absl::InvalidArgumentError(absl::StrCat("bad --concurrency entry '", c, "'"));
    o.concurrency.push_back(n);
  }
  o.balanced = absl::GetFlag(FLAGS_balanced);
  o.pin = absl::GetFlag(FLAGS_pin);
  o.gateway_cpus = absl::GetFlag(FLAGS_gateway_cpus);
  o.worker_cpus = absl::GetFlag(FLAGS_worker_cpus);
  o.streams = absl::GetFlag(FLAGS_streams);
  {
    auto l = IntList("added_latency_us", absl::GetFlag(FLAGS_added_latency_us), 0);
    if (!l.ok()) return l.status();
    o.latencies_us = *l;
    auto m = IntList("micro_batches", absl::GetFlag(FLAGS_micro_batches), 1);
    if (!m.ok()) return m.status();
    o.micro_batches = *m;
  }
  if (o.streams < 1) return absl::InvalidArgumentError("--streams must be >= 1");
  const int balanced_layers = absl::GetFlag(FLAGS_balanced_layers);
  if (balanced_layers < 1 || balanced_layers > 64)
    return absl::InvalidArgumentError("--balanced_layers must be in [1, 64]");
  const int balanced_inter = absl::GetFlag(FLAGS_balanced_inter);
  if (balanced_inter < 16 || balanced_inter > 65536)
    return absl::InvalidArgumentError("--balanced_inter must be in [16, 65536]");
  const int balanced_experts = absl::GetFlag(FLAGS_balanced_experts);
  const int balanced_top_k = absl::GetFlag(FLAGS_balanced_top_k);
  if (balanced_experts < 1 || balanced_experts > 1024 || balanced_top_k < 1 ||
      balanced_top_k > balanced_experts) {
    return absl::InvalidArgumentError(
        "--balanced_experts must be in [1, 1024] and --balanced_top_k in [1, experts]");
  }
  if (o.balanced && absl::GetFlag(FLAGS_cache_dir).empty()) {
    o.cache_dir = balanced_layers == 4 && balanced_inter == 640
                      ? "/tmp/moemesh-bench-model-balanced"
                      : absl::StrCat("/tmp/moemesh-bench-model-balanced-", balanced_layers, "l-",
                                     balanced_inter);
    if (balanced_experts != 8 || balanced_top_k != 2)
      absl::StrAppend(&o.cache_dir, "-", balanced_experts, "e-top", balanced_top_k);
  }
  o.model_dtype = absl::GetFlag(FLAGS_model_dtype);
  if (o.model_dtype != "f32" && o.model_dtype != "bf16")
    return absl::InvalidArgumentError("--model_dtype must be f32 or bf16");
  if (o.model_dtype != "f32") o.cache_dir += "-" + o.model_dtype;
  if (o.wire != "f32" && o.wire != "bf16")
    return absl::InvalidArgumentError("--wire_dtype must be f32 or bf16");
  if (o.groups < 1 || o.replicas < 1)
    return absl::InvalidArgumentError("--groups and --replicas must be >= 1");
  if (o.prompt < 1 || o.decode < 1 || o.decode_prompt < 1 || o.repeats < 1) {
    return absl::InvalidArgumentError(
        "--prompt, --decode, --decode_prompt and --repeats must be >= 1");
  }
  if (o.blas_threads < 0) return absl::InvalidArgumentError("--blas_threads must be >= 0");
  if (o.bin_dir.empty()) {
    char buf[4096];
    const ssize_t n = ::readlink("/proc/self/exe", buf, sizeof(buf) - 1);
    if (n <= 0) return absl::InternalError("cannot find this program's directory; give --bin_dir");
    std::string self(buf, static_cast<size_t>(n));
    o.bin_dir = self.substr(0, self.rfind('/'));
  }
  if (o.work_dir.empty()) {
    char tmpl[] = "/tmp/bench_mesh.XXXXXX";
    if (::mkdtemp(tmpl) == nullptr) return absl::InternalError("mkdtemp failed");
    o.work_dir = tmpl;
  }
  return o;
}

// The model to run: --model, or a generated one kept in --cache_dir.
absl::StatusOr<std::string> EnsureModel(const Options& o) {
  if (!o.model.empty()) return o.model;
  struct stat st;
  if (::stat((o.cache_dir + "/config.json").c_str(), &st) == 0) return o.cache_dir;
  GeneratorOptions g;
  g.config = o.balanced ? SmallMixtralConfig(8000, 512, absl::GetFlag(FLAGS_balanced_inter),
                                             absl::GetFlag(FLAGS_balanced_layers), 8, 8,
                                             absl::GetFlag(FLAGS_balanced_experts),
                                             absl::GetFlag(FLAGS_balanced_top_k))
             : o.small  ? SmallMixtralConfig(32000, 512, 1408, 4, 8, 2, 8, 2)
                        : SmallMixtralConfig(32000, 1024, 2816, 8, 16, 4, 8, 2);
  g.seed = 1;
  if (o.model_dtype == "bf16") g.dtype = DType::kBF16;
  std::fprintf(stderr, "generating the benchmark model in %s ...\n", o.cache_dir.c_str());
  if (auto s = GenerateModel(g, o.cache_dir); !s.ok()) return s;
  return o.cache_dir;
}

double Params(const ModelConfig& c) {
  return static_cast<double>(c.vocab_size) * c.hidden_size * 2 +
         c.num_layers * (static_cast<double>(c.hidden_size) * c.num_heads * c.head_dim * 2 +
                         2.0 * c.hidden_size * c.num_kv_heads * c.head_dim +
                         3.0 * c.num_experts * c.hidden_size * c.moe_intermediate_size +
                         static_cast<double>(c.num_experts) * c.hidden_size);
}

std::vector<int32_t> PromptTokens(int n, int salt, int vocab) {
  std::vector<int32_t> p(n);
  for (int i = 0; i < n; ++i) p[i] = static_cast<int32_t>((i * 7919 + 13 + salt * 104729) % vocab);
  return p;
}

// Decode stream s's prompt salt: its own (s + 1), or stream 0's for every stream when shared.
int DecodePromptSalt(const Options& o, int s) { return o.shared_prompts ? 1 : s + 1; }

double Mean(const std::vector<double>& v) {
  if (v.empty()) return 0;
  double s = 0;
  for (double x : v) s += x;
  return s / static_cast<double>(v.size());
}

// ---- single-process engine --------------------------------------------------------------

struct InprocResult {
  double load_s = 0, prefill_s = 0, decode_tps = 0, itl_ms = 0;
  std::vector<int32_t> tokens;  // greedy continuation of decode prompt 0
  // Aggregate decode tokens/s of C streams in one batch (each --concurrency C > 1), as the mesh
  // streams: their own prompts, prefilled together, then --decode steps.
  std::map<int, double> batched_tps;
};

absl::StatusOr<InprocResult> RunInproc(const Options& o, const std::string& dir) {
  InprocResult r;
  const absl::Time t0 = absl::Now();
  auto m = InprocModel::Load(dir);
  if (!m.ok()) return m.status();
  r.load_s = absl::ToDoubleSeconds(absl::Now() - t0);
  Engine& e = *(*m)->engine;
  const int vocab = e.config().vocab_size;
  const std::vector<int32_t> prompt = PromptTokens(o.prompt, 0, vocab);
  r.prefill_s = 1e30;
  for (int rep = 0; rep < o.repeats; ++rep) {
    auto seq = e.NewSequence();
    StepInput in{seq.get(), prompt, false};
    const absl::Time a = absl::Now();
    auto out = e.Step({&in, 1});
    if (!out.ok()) return out.status();
    r.prefill_s = std::min(r.prefill_s, absl::ToDoubleSeconds(absl::Now() - a));
  }
  // Decode exactly as mesh stream 0 at concurrency 1 does: its prompt, then --decode tokens.
  auto seq = e.NewSequence();
  std::vector<int32_t> feed = PromptTokens(o.decode_prompt, 1, vocab);
  std::vector<double> gaps;
  absl::Time last, first;
  for (int i = 0; i < o.decode; ++i) {
    StepInput in{seq.get(), feed, false};
    auto out = e.Step({&in, 1});
    if (!out.ok()) return out.status();
    const int32_t tok = Argmax((*out)[0].span().subspan((*out)[0].numel() - vocab, vocab));
    const absl::Time now = absl::Now();
    if (i == 0) {
      first = now;
    } else {
      gaps.push_back(absl::ToDoubleMilliseconds(now - last));
    }
    last = now;
    r.tokens.push_back(tok);
    feed = {tok};
  }
  r.itl_ms = Mean(gaps);
  r.decode_tps = o.decode > 1 ? (o.decode - 1) / absl::ToDoubleSeconds(last - first) : 0;
  for (int c : o.concurrency) {
    if (c <= 1 || o.decode <= 1) continue;
    std::vector<std::unique_ptr<Sequence>> seqs;
    std::vector<std::vector<int32_t>> feeds;
    for (int s = 0; s < c; ++s) {
      seqs.push_back(e.NewSequence());
      feeds.push_back(PromptTokens(o.decode_prompt, DecodePromptSalt(o, s), vocab));
    }
    absl::Time start;
    for (int i = 0; i < o.decode; ++i) {
      std::vector<StepInput> ins;
      for (int s = 0; s < c; ++s) ins.push_back(StepInput{seqs[s].get(), feeds[s], false});
      auto out = e.Step(ins);
      if (!out.ok()) return out.status();
      for (int s = 0; s < c; ++s) {
        const Tensor& t = (*out)[s];
        feeds[s] = {Argmax(t.span().subspan(t.numel() - vocab, vocab))};
      }
      if (i == 0) start = absl::Now();  // after the prefill step, as decode_tps
    }
    r.batched_tps[c] =
        static_cast<double>(c) * (o.decode - 1) / absl::ToDoubleSeconds(absl::Now() - start);
  }
  return r;
}

// ---- the mesh -----------------------------------------------------------------------------

absl::StatusOr<std::string> MetricsAddress(const std::string& log_path) {
  std::ifstream in(log_path);
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const size_t at = text.find("metrics on ");
  if (at == std::string::npos)
    return absl::NotFoundError(absl::StrCat(log_path, " names no metrics port"));
  const size_t b = at + 11, e = text.find_first_of(" \r\n", b);
  return text.substr(b, e == std::string::npos ? std::string::npos : e - b);
}

// A plain HTTP/1.0 GET of /metrics on loopback.
absl::StatusOr<std::string> Scrape(const std::string& address) {
  int port = 0;
  if (!absl::SimpleAtoi(address.substr(address.rfind(':') + 1), &port)) {
    return absl::InvalidArgumentError(absl::StrCat("bad metrics address ", address));
  }
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return absl::InternalError("socket() failed");
  struct timeval tv = {10, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  sockaddr_in sa = {};
  sa.sin_family = AF_INET;
  sa.sin_port = htons(static_cast<uint16_t>(port));
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  std::string resp;
  if (::connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) == 0) {
    const std::string req = "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    if (::send(fd, req.data(), req.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(req.size())) {
      char buf[16384];
      ssize_t n;
      while ((n = ::recv(fd, buf, sizeof(buf), 0)) > 0) resp.append(buf, static_cast<size_t>(n));
    }
  }
  ::close(fd);
  const size_t body = resp.find("\r\n\r\n");
  if (resp.compare(0, 5, "HTTP/") != 0 || resp.find(" 200 ") > 12 || body == std::string::npos) {
    return absl::UnavailableError(absl::StrCat("no /metrics answer from ", address));
  }
  return resp.substr(body + 4);
}

// Sum of samples named `name` whose label text contains `label` (e.g. "method=\"Forward\"").
double Sum(const std::string& text, const std::string& name,
           const std::vector<std::string>& labels = {}) {
  double sum = 0;
  std::istringstream lines(text);
  std::string line;
  while (std::getline(lines, line)) {
    if (line.empty() || line[0] == '#' || line.compare(0, name.size(), name) != 0) continue;
    if (line.size() <= name.size() || (line[name.size()] != '{' && line[name.size()] != ' '))
      continue;
    bool match = true;
    for (const auto& l : labels) match = match && line.find(l) != std::string::npos;
    if (!match) continue;
    std::istringstream value(line.substr(line.rfind(' ') + 1));
    double x = 0;
    if (value >> x) sum += x;
  }
  return sum;
}

struct RouterCounts {
  double forwards = 0, expert_tokens = 0, sends = 0;
};

RouterCounts ReadRouter(const std::string& address) {
  RouterCounts c;
  auto text = Scrape(address);
  if (!text.ok()) {
    std::fprintf(stderr, "warning: %s\n", text.status().ToString().c_str());
    return c;
  }
  c.forwards = Sum(*text, "moemesh_requests_total", {"method=\"Forward\"", "code=\"OK\""});
  c.expert_tokens = Sum(*text, "moemesh_expert_tokens_total");
  c.sends = Sum(*text, "moemesh_dispatch_token_sends_total");
  return c;
}

struct StreamResult {
  grpc::Status status;
  std::vector<int32_t> tokens;
  double ttft_ms = 0;
  std::vector<double> gaps_ms;
  absl::Time end;
};

StreamResult RunStream(v1::Gateway::Stub* stub, const std::vector<int32_t>& prompt, int max_tokens,
                       absl::Time start, std::atomic<int>* first_tokens = nullptr) {
  StreamResult r;
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Minutes(30)));
  v1::GenerateRequest req;
  req.mutable_prompt_tokens()->mutable_ids()->Add(prompt.begin(), prompt.end());
  req.set_max_tokens(max_tokens);
  req.set_ignore_eos(true);  // every stream generates exactly max_tokens
  auto reader = stub->Generate(&ctx, req);
  v1::GenerateResponse resp;
  absl::Time last = start;
  while (reader->Read(&resp)) {
    if (resp.token_ids_size() == 0) continue;
    const absl::Time now = absl::Now();
    if (r.tokens.empty()) {
      r.ttft_ms = absl::ToDoubleMilliseconds(now - start);
      if (first_tokens != nullptr) first_tokens->fetch_add(1);
    } else {
      r.gaps_ms.push_back(absl::ToDoubleMilliseconds(now - last) / resp.token_ids_size());
    }
    last = now;
    r.tokens.insert(r.tokens.end(), resp.token_ids().begin(), resp.token_ids().end());
  }
  r.status = reader->Finish();
  r.end = absl::Now();
  return r;
}

// A blocker: a kBlockerTokens-token prompt (max_tokens 1) sent 30 ms before a set of streams,
// so that its prefill step is running when they arrive and all of them are queued for the same
// next step. Otherwise the first step takes whichever prompt came first, and the step structure
// depends on arrival timing. Start() returns after the 30 ms; Finish() waits for its answer.
constexpr int kBlockerTokens = 256;

class Blocker {
 public:
  Blocker(const std::string& gateway, int salt, int vocab, absl::Time start)
      : stub_(v1::Gateway::NewStub(MakeChannel(gateway))), thread_([this, salt, vocab, start] {
          result_ = RunStream(stub_.get(), PromptTokens(kBlockerTokens, salt, vocab), 1, start);
        }) {
    absl::SleepFor(absl::Milliseconds(30));
  }
  ~Blocker() {
    if (thread_.joinable()) thread_.join();
  }
  const StreamResult& Finish() {
    if (thread_.joinable()) thread_.join();
    return result_;
  }

 private:
  std::unique_ptr<v1::Gateway::Stub> stub_;
  StreamResult result_;
  std::thread thread_;
};

struct DecodeRow {
  int concurrency = 0;
  double wall_s = 0, tokens_per_s = 0, itl_ms = 0, ttft_ms = 0, tokens_per_step = 0;
  // Tokens after each stream's first, over the time from the last first token to the last token:
  // the decode phase alone, as bench_engine and the single-process rows measure it.
  double decode_tokens_per_s = 0;
  int64_t tokens = 0;
  // Per gateway step of the decode phase (from every stream's first token on), ms: the step,
  // the gateway's busy time by stage, its wait for MoE results, and the workers' time inside
  // expert FFNs (summed over workers).
  double steps = 0, step_ms = 0, attention_ms = 0, moe_call_ms = 0, dense_ffn_ms = 0,
         lm_head_ms = 0, other_ms = 0, wait_ms = 0, workers_ms = 0;
  // Per call, ms: the router's Forward (receipt to answer), a worker's RunExperts (receipt to
  // computed) and its FFN time; RunExperts calls per Forward.
  double forward_call_ms = 0, run_call_ms = 0, ffn_call_ms = 0, runs_per_forward = 0;
};

struct WireBytes {
  double gateway_router = 0;   // request + response, per token per MoE layer
  double router_worker = 0;    // request + response, per (token, group) send
  double sends_per_token = 0;  // measured (token, group) sends per token per MoE layer
};

// Serialized sizes of real messages for a batch of 64 tokens, per token.
WireBytes MessageBytes(const ModelConfig& cfg, DType wire) {
  const int64_t n = 64;
  Tensor h =
      Tensor::FromVector({n, cfg.hidden_size}, std::vector<float>(n * cfg.hidden_size, 0.5f));
  v1::ForwardRequest fr;
  fr.set_layer(cfg.num_layers - 1);
  TensorToProto(h, wire, fr.mutable_hidden());
  fr.set_output_dtype(DTypeToProto(wire));
  v1::ForwardResponse fo;
  TensorToProto(h, wire, fo.mutable_output());
  // One expert per send on average when top-k experts spread over several groups; the
  // assignment lists are a few bytes either way.
  const int per_send = std::max(1, cfg.top_k / 2);
  v1::RunExpertsRequest rr;
  rr.set_layer(cfg.num_layers - 1);
  TensorToProto(h, wire, rr.mutable_tokens());
  rr.add_offsets(0);
  for (int64_t t = 0; t < n; ++t) {
    for (int k = 0; k < per_send; ++k) {
      rr.add_experts(cfg.num_experts - 1);
      rr.add_weights(0.25f);
    }
    rr.add_offsets(static_cast<int32_t>((t + 1) * per_send));
  }
  rr.set_output_dtype(DTypeToProto(wire));
  v1::RunExpertsResponse ro;
  TensorToProto(h, wire, ro.mutable_output());
  WireBytes w;
  w.gateway_router = static_cast<double>(fr.ByteSizeLong() + fo.ByteSizeLong()) / n;
  w.router_worker = static_cast<double>(rr.ByteSizeLong() + ro.ByteSizeLong()) / n;
  return w;
}

// ---- the testbed ---------------------------------------------------------------------------

struct TestbedRow {
  int latency_us = 0, micro = 1;
  bool pinned = false;
  double wall_s = 0, steps = 0;
  double step_wall_s = 0;    // inside Engine::Step, summed
  double gw_busy_s = 0;      // engine thread computing inside steps
  double gw_wait_s = 0;      // engine thread waiting for MoE results
  double worker_busy_s = 0;  // inside expert FFNs, every worker summed
  double gw_cpu_s = 0;       // CPU time of the gateway and the router processes
  double worker_cpu_s = 0;   // CPU time of every worker process
  double bench_cpu_s = 0;    // this process: the delaying proxies and the stream clients
  // Engine steps by kind and how many of them ran split (the adaptive policy's choices).
  double decode_steps = 0, decode_split = 0, prefill_steps = 0, prefill_split = 0;
  int64_t tokens = 0;  // generated
  std::vector<std::vector<int32_t>> outputs;
  // Per step, ms: T wall; G the gateway side's busy time (CPU time of the gateway and router
  // processes, which share a CPU when pinned); E the workers' (CPU time of every worker);
  // R = T - G - E, what neither side's compute explains (network, queueing, waiting).
  double T() const { return wall_s / steps * 1e3; }
  double W() const { return gw_wait_s / steps * 1e3; }
  double G() const { return gw_cpu_s / steps * 1e3; }
  double E() const { return worker_cpu_s / steps * 1e3; }
  double F() const { return worker_busy_s / steps * 1e3; }
  double R() const { return T() - G() - E(); }
};

// CPU time (user + system, every thread) a process has used, in seconds.
double CpuSeconds(pid_t pid) {
  std::ifstream in(absl::StrCat("/proc/", pid, "/stat"));
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const size_t paren = text.rfind(')');
  if (paren == std::string::npos) return 0;
  std::vector<std::string> f = absl::StrSplit(text.substr(paren + 2), ' ');
  // After "pid (comm) ", field 3 (state) is f[0]; utime and stime are fields 14 and 15.
  double ut = 0, st = 0;
  if (f.size() < 13 || !absl::SimpleAtod(f[11], &ut) || !absl::SimpleAtod(f[12], &st)) return 0;
  return (ut + st) / static_cast<double>(::sysconf(_SC_CLK_TCK));
}

double SelfCpuSeconds() {
  rusage ru;
  ::getrusage(RUSAGE_SELF, &ru);
  auto s = [](const timeval& tv) { return tv.tv_sec + tv.tv_usec / 1e6; };
  return s(ru.ru_utime) + s(ru.ru_stime);
}

struct Scraped {
  double steps = 0, step_wall = 0, busy = 0, wait = 0, worker = 0;
  // The gateway's busy time by stage (moemesh_gateway_stage_seconds_total).
  double attention = 0, moe_call = 0, dense_ffn = 0, lm_head = 0, other = 0;
  // Calls and their time from receipt to answer: the router's Forward, the workers'
  // RunExperts (queue and compute); the workers' calls' FFN time is `worker`.
  double forwards = 0, forward_s = 0, runs = 0, run_s = 0;
  // Engine steps by kind, and those of them cut into two or more micro-batches.
  double decode = 0, decode_split = 0, prefill = 0, prefill_split = 0;
};

Scraped ScrapeAll(const std::string& gateway, const std::vector<std::string>& workers,
                  const std::string& router = "") {
  Scraped s;
  if (!router.empty()) {
    if (auto t = Scrape(router); t.ok()) {
      s.forwards = Sum(*t, "moemesh_request_duration_seconds_count", {"method=\"Forward\""});
      s.forward_s = Sum(*t, "moemesh_request_duration_seconds_sum", {"method=\"Forward\""});
    } else {
      std::fprintf(stderr, "warning: %s\n", t.status().ToString().c_str());
    }
  }
  if (auto t = Scrape(gateway); t.ok()) {
    s.steps = Sum(*t, "moemesh_step_duration_seconds_count");
    s.step_wall = Sum(*t, "moemesh_step_duration_seconds_sum");
    s.busy = Sum(*t, "moemesh_gateway_busy_seconds_total");
    s.wait = Sum(*t, "moemesh_gateway_moe_wait_seconds_total");
    auto stage = [&](const char* name) {
      return Sum(*t, "moemesh_gateway_stage_seconds_total", {absl::StrCat("stage=\"", name, "\"")});
    };
    s.attention = stage("attention");
    s.moe_call = stage("moe_call");
    s.dense_ffn = stage("dense_ffn");
    s.lm_head = stage("lm_head");
    s.other = stage("other");
    for (const bool decode : {true, false}) {
      const std::string kind = decode ? "kind=\"decode\"" : "kind=\"prefill\"";
      const double all = Sum(*t, "moemesh_gateway_steps_total", {kind});
      const double whole = Sum(*t, "moemesh_gateway_steps_total", {kind, "micro_batches=\"1\""});
      (decode ? s.decode : s.prefill) = all;
      (decode ? s.decode_split : s.prefill_split) = all - whole;
    }
  } else {
    std::fprintf(stderr, "warning: %s\n", t.status().ToString().c_str());
  }
  for (const auto& w : workers) {
    if (auto t = Scrape(w); t.ok()) {
      s.worker += Sum(*t, "moemesh_expert_compute_seconds_total");
      s.runs += Sum(*t, "moemesh_request_duration_seconds_count", {"method=\"RunExperts\""});
      s.run_s += Sum(*t, "moemesh_request_duration_seconds_sum", {"method=\"RunExperts\""});
    } else {
      std::fprintf(stderr, "warning: %s\n", t.status().ToString().c_str());
    }
  }
  return s;
}

absl::StatusOr<TestbedRow> RunTestbedSetting(const Options& o, const std::string& dir,
                                             const ModelConfig& cfg, int latency_us, int micro) {
  TestbedRow row;
  row.latency_us = latency_us;
  row.micro = micro;
  row.pinned = o.pin;
  MeshOptions mo;
  mo.bin_dir = o.bin_dir;
  mo.model = dir;
  mo.work_dir = absl::StrCat(o.work_dir, "/lat", latency_us, "-mb", micro, o.pin ? "-pin" : "");
  mo.groups = o.groups;
  mo.replicas = o.replicas;
  mo.wire_dtype = o.wire;
  mo.metrics = true;
  mo.startup_timeout = absl::Seconds(600);
  mo.micro_batches = micro;
  mo.added_latency = absl::Microseconds(latency_us);
  if (o.pin) {
    mo.gateway_cpus = o.gateway_cpus;
    mo.worker_cpus = o.worker_cpus;
    mo.kernel_threads = 1;
  }
  // Every prompt is prefilled whole in the step it joins, so that every setting runs the same
  // steps (the scheduler's chunks depend on when requests arrive; the logits would not, the
  // kernels being chunk-invariant, but the step structure and with it the profile would).
  mo.gateway_args = {absl::StrCat("--max_step_tokens=", std::max(o.prompt * o.streams, 256)),
                     absl::StrCat("--max_running=", std::max(64, o.streams))};
  auto mesh_or = Mesh::Start(mo);
  if (!mesh_or.ok()) return mesh_or.status();
  Mesh& mesh = **mesh_or;
  auto gw_metrics = MetricsAddress(mesh.gateway().log);
  if (!gw_metrics.ok()) return gw_metrics.status();
  std::vector<std::string> worker_metrics;
  for (const auto& w : mesh.workers()) {
    auto a = MetricsAddress(w.log);
    if (!a.ok()) return a.status();
    worker_metrics.push_back(*a);
  }
  std::vector<std::unique_ptr<v1::Gateway::Stub>> stubs;
  for (int i = 0; i < o.streams; ++i)
    stubs.push_back(v1::Gateway::NewStub(MakeChannel(mesh.gateway_address())));
  {
    // Warm-up: the workers fault their weights in, every channel connects.
    StreamResult w =
        RunStream(stubs[0].get(), PromptTokens(64, 999, cfg.vocab_size), 2, absl::Now());
    if (!w.status.ok()) return absl::InternalError(w.status.error_message());
  }
  auto cpu = [&](double* gw, double* workers) {
    *gw = CpuSeconds(mesh.gateway().pid) + CpuSeconds(mesh.router().pid);
    *workers = 0;
    for (const auto& w : mesh.workers()) *workers += CpuSeconds(w.pid);
  };
  double gw0, wk0;
  cpu(&gw0, &wk0);
  const double self0 = SelfCpuSeconds();
  const Scraped before = ScrapeAll(*gw_metrics, worker_metrics);
  std::vector<StreamResult> results(o.streams);
  std::vector<std::thread> threads;
  const absl::Time start = absl::Now();
  // A blocker first (one input alone would be one micro-batch). Its time is in the measured
  // window, the same for every setting.
  Blocker blocker_run(mesh.gateway_address(), 998, cfg.vocab_size, start);
  for (int i = 0; i < o.streams; ++i) {
    threads.emplace_back([&, i] {
      results[i] =
          RunStream(stubs[i].get(), PromptTokens(o.prompt, i + 1, cfg.vocab_size), o.decode, start);
    });
  }
  for (auto& t : threads) t.join();
  const StreamResult& blocker = blocker_run.Finish();
  if (!blocker.status.ok()) return absl::InternalError(blocker.status.error_message());
  absl::Time end = blocker.end;
  for (const StreamResult& r : results) {
    if (!r.status.ok()) return absl::InternalError(r.status.error_message());
    end = std::max(end, r.end);
    row.tokens += static_cast<int64_t>(r.tokens.size());
    row.outputs.push_back(r.tokens);
  }
  row.wall_s = absl::ToDoubleSeconds(end - start);
  const Scraped after = ScrapeAll(*gw_metrics, worker_metrics);
  double gw1, wk1;
  cpu(&gw1, &wk1);
  row.gw_cpu_s = gw1 - gw0;
  row.worker_cpu_s = wk1 - wk0;
  row.bench_cpu_s = SelfCpuSeconds() - self0;
  row.steps = after.steps - before.steps;
  row.step_wall_s = after.step_wall - before.step_wall;
  row.gw_busy_s = after.busy - before.busy;
  row.gw_wait_s = after.wait - before.wait;
  row.worker_busy_s = after.worker - before.worker;
  row.decode_steps = after.decode - before.decode;
  row.decode_split = after.decode_split - before.decode_split;
  row.prefill_steps = after.prefill - before.prefill;
  row.prefill_split = after.prefill_split - before.prefill_split;
  if (absl::Status s = mesh.Stop(); !s.ok())
    std::fprintf(stderr, "warning: mesh stop: %s\n", s.ToString().c_str());
  if (row.steps <= 0) return absl::InternalError("no engine steps were counted");
  return row;
}

int RunTestbed(const Options& o, const std::string& dir, const ModelConfig& cfg) {
  if (o.pin)
    ::setenv("OPENBLAS_NUM_THREADS", "1", 1);
  else if (o.blas_threads > 0)
    ::setenv("OPENBLAS_NUM_THREADS", absl::StrCat(o.blas_threads).c_str(), 1);
  // Best of --repeats per setting: other tenants of a small machine only ever slow a run down.
  // The settings take turns (every setting once, then again), so that a slow spell of the
  // machine lands on all of them rather than on whichever ran during it.
  std::vector<std::optional<TestbedRow>> best(o.latencies_us.size() * o.micro_batches.size());
  for (int rep = 0; rep < o.repeats; ++rep) {
    for (size_t li = 0; li < o.latencies_us.size(); ++li) {
      for (size_t mi = 0; mi < o.micro_batches.size(); ++mi) {
        const int lat = o.latencies_us[li], mb = o.micro_batches[mi];
        std::fprintf(stderr, "testbed: added latency %d us, %d micro-batch(es)%s, run %d ...\n",
                     lat, mb, o.pin ? ", pinned" : "", rep + 1);
        auto r = RunTestbedSetting(o, dir, cfg, lat, mb);
        if (!r.ok()) {
          std::fprintf(stderr, "%s\n", r.status().ToString().c_str());
          return 1;
        }
        std::fprintf(stderr, "  %.2f s\n", r->wall_s);
        std::optional<TestbedRow>& b = best[li * o.micro_batches.size() + mi];
        if (!b || r->wall_s < b->wall_s) b = *std::move(r);
      }
    }
  }
  std::vector<TestbedRow> rows;
  for (std::optional<TestbedRow>& b : best) rows.push_back(*std::move(b));
  std::printf(
      "\nmodel %s: %.0fM params, hidden %d, %d layers, %d heads (%d KV), %d experts of %d "
      "top-%d, vocab %d; %d group(s), wire %s; %d streams x %d-token prompts x %d tokens; %s\n\n",
      dir.c_str(), Params(cfg) / 1e6, cfg.hidden_size, cfg.num_layers, cfg.num_heads,
      cfg.num_kv_heads, cfg.num_experts, cfg.moe_intermediate_size, cfg.top_k, cfg.vocab_size,
      o.groups, o.wire.c_str(), o.streams, o.prompt, o.decode,
      o.pin ? absl::StrCat("pinned: gateway+router on CPU ", o.gateway_cpus, ", workers on CPU ",
                           o.worker_cpus)
                  .c_str()
            : "unpinned");
  std::printf(
      "Per engine step, ms. G: CPU time of the gateway + router processes; E: of the workers; "
      "idle = T - busy; engine wait: the gateway's engine thread waiting for MoE results; "
      "FFN: inside expert FFNs; bench: this process (proxies, clients) CPU.\n\n"
      "| added one-way latency | micro-batches | wall s | steps | step T | gateway busy G | "
      "gateway idle | engine wait | workers busy E | workers idle | FFN | R = T-G-E | bench CPU "
      "| tokens/s | greedy = first "
      "|\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
  nlohmann::json j = nlohmann::json::array();
  for (const TestbedRow& r : rows) {
    const bool same = r.outputs == rows.front().outputs;
    for (size_t i = 0; i < r.outputs.size() && !same; ++i) {
      if (r.outputs[i] == rows.front().outputs[i]) continue;
      size_t at = 0;
      while (at < r.outputs[i].size() && at < rows.front().outputs[i].size() &&
             r.outputs[i][at] == rows.front().outputs[i][at])
        ++at;
      std::fprintf(stderr, "%d us, %d micro-batches: stream %zu differs from token %zu\n",
                   r.latency_us, r.micro, i, at);
    }
    std::printf(
        "| %d us | %d | %.2f | %.0f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f "
        "| %.1f | %s |\n",
        r.latency_us, r.micro, r.wall_s, r.steps, r.T(), r.G(), r.T() - r.G(), r.W(), r.E(),
        r.T() - r.E(), r.F(), r.R(), r.bench_cpu_s / r.steps * 1e3, r.tokens / r.wall_s,
        same ? "yes" : "NO");
    j.push_back({{"added_latency_us", r.latency_us},
                 {"micro_batches", r.micro},
                 {"pinned", r.pinned},
                 {"wall_s", r.wall_s},
                 {"steps", r.steps},
                 {"step_ms", r.T()},
                 {"gateway_busy_ms", r.G()},
                 {"gateway_idle_ms", r.W()},
                 {"gateway_engine_busy_s", r.gw_busy_s},
                 {"engine_step_wall_s", r.step_wall_s},
                 {"workers_busy_ms", r.E()},
                 {"workers_idle_ms", r.T() - r.E()},
                 {"workers_ffn_ms", r.F()},
                 {"gateway_cpu_s", r.gw_cpu_s},
                 {"workers_cpu_s", r.worker_cpu_s},
                 {"bench_cpu_s", r.bench_cpu_s},
                 {"rest_ms", r.R()},
                 {"decode_steps", r.decode_steps},
                 {"decode_steps_split", r.decode_split},
                 {"prefill_steps", r.prefill_steps},
                 {"prefill_steps_split", r.prefill_split},
                 {"generated_tokens", r.tokens},
                 {"greedy_equal_first", same}});
  }
  // Which steps ran split: with the adaptive policy, the engine's choice per step size.
  std::printf(
      "\n| added one-way latency | micro-batches | decode steps run split | prefill steps run "
      "split |\n|---|---|---|---|\n");
  for (const TestbedRow& r : rows) {
    std::printf("| %d us | %d | %.0f of %.0f | %.0f of %.0f |\n", r.latency_us, r.micro,
                r.decode_split, r.decode_steps, r.prefill_split, r.prefill_steps);
  }
  // The bound from each latency's one-micro-batch profile, and what the others captured.
  std::printf(
      "\n| added one-way latency | bound (G+E+R)/max(G,E,(G+E)/2+R) | micro-batches | speed-up "
      "(wall) | share of the bound's gain |\n|---|---|---|---|---|\n");
  nlohmann::json b = nlohmann::json::array();
  for (const TestbedRow& one : rows) {
    if (one.micro != 1) continue;
    const double G = one.G(), E = one.E(), R = std::max(0.0, one.R());
    const double bound = (G + E + R) / std::max({G, E, (G + E) / 2 + R});
    for (const TestbedRow& r : rows) {
      if (r.latency_us != one.latency_us || r.micro == 1) continue;
      const double speedup = one.wall_s / r.wall_s;
      const double share = bound > 1 ? (speedup - 1) / (bound - 1) : 0;
      std::printf("| %d us | %.2f | %d | %.2f | %.0f%% |\n", one.latency_us, bound, r.micro,
                  speedup, share * 100);
      b.push_back({{"added_latency_us", one.latency_us},
                   {"bound", bound},
                   {"micro_batches", r.micro},
                   {"speedup", speedup},
                   {"share", share}});
    }
  }
  if (!o.json.empty()) {
    std::ofstream(o.json)
        << nlohmann::json{{"rows", j}, {"bounds", b}, {"work_dir", o.work_dir}}.dump(2) << "\n";
  }
  return 0;
}

int Run(const Options& o) {
  auto dir = EnsureModel(o);
  if (!dir.ok()) {
    std::fprintf(stderr, "%s\n", dir.status().ToString().c_str());
    return 1;
  }
  auto cfg_or = LoadModelConfig(*dir);
  if (!cfg_or.ok()) {
    std::fprintf(stderr, "%s\n", cfg_or.status().ToString().c_str());
    return 1;
  }
  const ModelConfig cfg = *cfg_or;
  if (!o.latencies_us.empty()) return RunTestbed(o, *dir, cfg);
  const int moe_layers = static_cast<int>(cfg.MoeLayers().size());
  const DType wire = o.wire == "bf16" ? DType::kBF16 : DType::kF32;
  nlohmann::json j = {{"model", *dir},
                      {"params", Params(cfg)},
                      {"hidden_size", cfg.hidden_size},
                      {"num_layers", cfg.num_layers},
                      {"num_experts", cfg.num_experts},
                      {"top_k", cfg.top_k},
                      {"vocab_size", cfg.vocab_size},
                      {"groups", o.groups},
                      {"replicas", o.replicas},
                      {"wire_dtype", o.wire},
                      {"prompt_tokens", o.prompt},
                      {"decode_tokens", o.decode},
                      {"decode_prompt_tokens", o.decode_prompt},
                      {"decode_prompts", o.shared_prompts ? "shared" : "distinct"},
                      {"cpus", std::thread::hardware_concurrency()},
                      {"blas_threads", o.blas_threads},
                      {"worker_kernel_threads", o.worker_kernel_threads}};

  // 1. The single-process engine, alone on the machine.
  std::optional<InprocResult> inproc;
  if (o.inproc) {
    std::fprintf(stderr, "single-process engine ...\n");
    auto r = RunInproc(o, *dir);
    if (!r.ok()) {
      std::fprintf(stderr, "in-process: %s\n", r.status().ToString().c_str());
      return 1;
    }
    inproc = *std::move(r);
    j["inproc"] = {{"load_s", inproc->load_s},
                   {"prefill_s", inproc->prefill_s},
                   {"prefill_tokens_per_s", o.prompt / inproc->prefill_s},
                   {"decode_tokens_per_s", inproc->decode_tps},
                   {"inter_token_ms", inproc->itl_ms}};
  }

  // 2. The mesh.
  if (o.blas_threads > 0) ::setenv("OPENBLAS_NUM_THREADS", absl::StrCat(o.blas_threads).c_str(), 1);
  MeshOptions mo;
  mo.bin_dir = o.bin_dir;
  mo.model = *dir;
  mo.work_dir = o.work_dir;
  mo.groups = o.groups;
  mo.replicas = o.replicas;
  mo.wire_dtype = o.wire;
  mo.metrics = true;
  mo.startup_timeout = absl::Seconds(600);
  if (o.worker_kernel_threads > 0) {
    mo.worker_args = {absl::StrCat("--kernel_threads=", o.worker_kernel_threads)};
  }
  // Every decode stream's prompt fits in one step with the others (see the blocker below).
  const int max_concurrency = *std::max_element(o.concurrency.begin(), o.concurrency.end());
  mo.gateway_args = {absl::StrCat("--max_step_tokens=",
                                  std::max({o.prompt, 256, o.decode_prompt * max_concurrency})),
                     absl::StrCat("--max_running=", std::max(64, max_concurrency))};
  std::fprintf(stderr, "starting the mesh (%d groups x %d replicas, logs in %s) ...\n", o.groups,
               o.replicas, o.work_dir.c_str());
  const absl::Time t0 = absl::Now();
  auto mesh = Mesh::Start(mo);
  if (!mesh.ok()) {
    std::fprintf(stderr, "%s\n", mesh.status().ToString().c_str());
    return 1;
  }
  j["mesh_start_s"] = absl::ToDoubleSeconds(absl::Now() - t0);
  auto router_metrics = MetricsAddress((*mesh)->router().log);
  if (!router_metrics.ok()) {
    std::fprintf(stderr, "%s\n", router_metrics.status().ToString().c_str());
    return 1;
  }
  auto gateway_metrics = MetricsAddress((*mesh)->gateway().log);
  if (!gateway_metrics.ok()) {
    std::fprintf(stderr, "%s\n", gateway_metrics.status().ToString().c_str());
    return 1;
  }
  std::vector<std::string> worker_metrics;
  for (const auto& w : (*mesh)->workers()) {
    auto a = MetricsAddress(w.log);
    if (!a.ok()) {
      std::fprintf(stderr, "%s\n", a.status().ToString().c_str());
      return 1;
    }
    worker_metrics.push_back(*a);
  }
  double score_s = 1e30, ttft_s = 1e30;
  std::vector<DecodeRow> rows;
  bool tokens_match = false;
  {
    auto channel = MakeChannel((*mesh)->gateway_address());
    auto stub = v1::Gateway::NewStub(channel);
    std::fprintf(stderr, "prefill ...\n");
    // One unmeasured round first: the workers fault their weights in. Every Score and Generate
    // has a prompt of its own: a repeated one would be served from the gateway's prefix cache.
    for (int rep = 0; rep <= o.repeats; ++rep) {
      const std::vector<int32_t> prompt = PromptTokens(o.prompt, 1000 + 2 * rep, cfg.vocab_size);
      const std::vector<int32_t> prompt2 = PromptTokens(o.prompt, 1001 + 2 * rep, cfg.vocab_size);
      grpc::ClientContext ctx;
      v1::ScoreRequest req;
      req.mutable_tokens()->Add(prompt.begin(), prompt.end());
      v1::ScoreResponse resp;
      const absl::Time a = absl::Now();
      grpc::Status s = stub->Score(&ctx, req, &resp);
      const double took = absl::ToDoubleSeconds(absl::Now() - a);
      if (!s.ok()) {
        std::fprintf(stderr, "Score: %s\n", s.error_message().c_str());
        return 1;
      }
      if (rep > 0) score_s = std::min(score_s, took);
      const absl::Time b = absl::Now();
      StreamResult g = RunStream(stub.get(), prompt2, 1, b);
      if (!g.status.ok()) {
        std::fprintf(stderr, "Generate: %s\n", g.status.error_message().c_str());
        return 1;
      }
      if (rep > 0) ttft_s = std::min(ttft_s, g.ttft_ms / 1e3);
    }
    for (int c : o.concurrency) {
      std::fprintf(stderr, "decode, concurrency %d ...\n", c);
      std::vector<std::unique_ptr<v1::Gateway::Stub>> stubs;
      for (int i = 0; i < c; ++i)
        stubs.push_back(v1::Gateway::NewStub(MakeChannel((*mesh)->gateway_address())));
      const RouterCounts before = ReadRouter(*router_metrics);
      std::atomic<int> first_tokens{0}, finished{0};
      std::vector<StreamResult> results(c);
      absl::Barrier* barrier = new absl::Barrier(c + 1);
      absl::Time start;
      absl::Mutex start_mu;
      std::vector<std::thread> threads;
      for (int i = 0; i < c; ++i) {
        threads.emplace_back([&, i] {
          const std::vector<int32_t> p =
              PromptTokens(o.decode_prompt, DecodePromptSalt(o, i), cfg.vocab_size);
          if (barrier->Block()) delete barrier;
          absl::Time s;
          {
            absl::MutexLock lock(&start_mu);
            s = start;
          }
          results[i] = RunStream(stubs[i].get(), p, o.decode, s, &first_tokens);
          finished.fetch_add(1);
        });
      }
      {
        absl::MutexLock lock(&start_mu);
        start = absl::Now();
      }
      // Shared prompts: the streams must run in lockstep, as the single process's do (one step
      // admits every prompt, so all decode the same token at the same position and route alike).
      // Streams that reached the gateway in different steps would sit a token apart for good and
      // route differently, so a blocker goes first. Its time counts in TTFT and the aggregate,
      // not in the decode phase.
      std::optional<Blocker> blocker;
      if (o.shared_prompts && c > 1)
        blocker.emplace((*mesh)->gateway_address(), 900 + c, cfg.vocab_size, start);
      if (barrier->Block()) delete barrier;
      // The stage table covers the decode phase: from when every stream has its first token
      // (its prompt's step, and the blocker's, are behind it).
      while (first_tokens.load() < c && finished.load() < c) {
        absl::SleepFor(absl::Milliseconds(2));
      }
      const Scraped stages_before = ScrapeAll(*gateway_metrics, worker_metrics, *router_metrics);
      for (auto& t : threads) t.join();
      if (blocker && !blocker->Finish().status.ok()) {
        std::fprintf(stderr, "blocker: %s\n", blocker->Finish().status.error_message().c_str());
        return 1;
      }
      const RouterCounts after = ReadRouter(*router_metrics);
      DecodeRow row;
      row.concurrency = c;
      {
        // The gateway observes a step's metrics after its tokens go out: scrape until the step
        // count stops growing (bounded), so that the last step is in.
        Scraped sa = ScrapeAll(*gateway_metrics, worker_metrics, *router_metrics);
        for (int i = 0; i < 20; ++i) {
          absl::SleepFor(absl::Milliseconds(50));
          Scraped again = ScrapeAll(*gateway_metrics, worker_metrics, *router_metrics);
          const bool settled = again.steps == sa.steps;
          sa = again;
          if (settled) break;
        }
        const Scraped& sb = stages_before;
        row.steps = sa.steps - sb.steps;
        if (row.steps > 0) {
          auto ms = [&](double a, double b) { return (a - b) / row.steps * 1e3; };
          row.step_ms = ms(sa.step_wall, sb.step_wall);
          row.attention_ms = ms(sa.attention, sb.attention);
          row.moe_call_ms = ms(sa.moe_call, sb.moe_call);
          row.dense_ffn_ms = ms(sa.dense_ffn, sb.dense_ffn);
          row.lm_head_ms = ms(sa.lm_head, sb.lm_head);
          row.other_ms = ms(sa.other, sb.other);
          row.wait_ms = ms(sa.wait, sb.wait);
          row.workers_ms = ms(sa.worker, sb.worker);
        }
        const double forwards = sa.forwards - sb.forwards, runs = sa.runs - sb.runs;
        if (forwards > 0) row.forward_call_ms = (sa.forward_s - sb.forward_s) / forwards * 1e3;
        if (runs > 0) {
          row.run_call_ms = (sa.run_s - sb.run_s) / runs * 1e3;
          row.ffn_call_ms = (sa.worker - sb.worker) / runs * 1e3;
          row.runs_per_forward = forwards > 0 ? runs / forwards : 0;
        }
      }
      std::vector<double> gaps, ttfts;
      absl::Time end = start, last_first = start;
      int64_t after_first = 0;
      for (const StreamResult& r : results) {
        if (!r.status.ok()) {
          std::fprintf(stderr, "decode stream: %s\n", r.status.error_message().c_str());
          return 1;
        }
        row.tokens += static_cast<int64_t>(r.tokens.size());
        gaps.insert(gaps.end(), r.gaps_ms.begin(), r.gaps_ms.end());
        ttfts.push_back(r.ttft_ms);
        end = std::max(end, r.end);
        last_first = std::max(last_first, start + absl::Milliseconds(r.ttft_ms));
        after_first += std::max<int64_t>(0, static_cast<int64_t>(r.tokens.size()) - 1);
      }
      if (end > last_first) {
        row.decode_tokens_per_s = after_first / absl::ToDoubleSeconds(end - last_first);
      }
      row.wall_s = absl::ToDoubleSeconds(end - start);
      row.tokens_per_s = static_cast<double>(row.tokens) / row.wall_s;
      row.itl_ms = Mean(gaps);
      row.ttft_ms = Mean(ttfts);
      double steps = (after.forwards - before.forwards) / moe_layers;
      double fed = (after.expert_tokens - before.expert_tokens) / (cfg.top_k * moe_layers);
      if (blocker) {  // its prefill is a step of its own, not the streams'
        steps -= 1;
        fed -= kBlockerTokens;
      }
      row.tokens_per_step = steps > 0 ? fed / steps : 0;
      rows.push_back(row);
      if (c == o.concurrency.front() && c == 1 && inproc)
        tokens_match = results[0].tokens == inproc->tokens;
    }
  }
  const RouterCounts totals = ReadRouter(*router_metrics);
  WireBytes wb = MessageBytes(cfg, wire);
  if (totals.expert_tokens > 0)
    wb.sends_per_token = totals.sends / (totals.expert_tokens / cfg.top_k);
  const absl::Status stopped = (*mesh)->Stop();
  if (!stopped.ok()) std::fprintf(stderr, "warning: mesh stop: %s\n", stopped.ToString().c_str());

  // 3. Report.
  const int dsize = wire == DType::kBF16 ? 2 : 4;
  std::printf(
      "\nmodel %s: %.0fM params, hidden %d, %d layers, %d experts top-%d, vocab %d; "
      "mesh %d group(s) x %d replica(s), wire %s; %u CPUs shared by every process\n\n",
      dir->c_str(), Params(cfg) / 1e6, cfg.hidden_size, cfg.num_layers, cfg.num_experts, cfg.top_k,
      cfg.vocab_size, o.groups, o.replicas, o.wire.c_str(), std::thread::hardware_concurrency());
  std::printf("| prefill (%d tokens) | latency ms | tokens/s |\n|---|---|---|\n", o.prompt);
  if (inproc) {
    std::printf("| single process, one engine step | %.1f | %.1f |\n", inproc->prefill_s * 1e3,
                o.prompt / inproc->prefill_s);
  }
  std::printf("| mesh, Generate max_tokens=1 (time to first token) | %.1f | %.1f |\n", ttft_s * 1e3,
              o.prompt / ttft_s);
  std::printf("| mesh, Score (returns %d x %d F32 logits, %.1f MB) | %.1f | %.1f |\n", o.prompt,
              cfg.vocab_size, 4.0 * o.prompt * cfg.vocab_size / 1e6, score_s * 1e3,
              o.prompt / score_s);
  std::printf(
      "\n| decode (%d tokens/stream, %s prompts) | streams | tokens/s (aggregate) | decode-phase "
      "tokens/s | "
      "mean inter-token ms | mean TTFT ms | tokens per step |\n|---|---|---|---|---|---|---|\n",
      o.decode, o.shared_prompts ? "shared" : "distinct");
  if (inproc) {
    std::printf("| single process | 1 | - | %.2f | %.1f | - | 1 |\n", inproc->decode_tps,
                inproc->itl_ms);
    for (const auto& [c, tps] : inproc->batched_tps) {
      std::printf("| single process | %d | - | %.2f | - | - | %d |\n", c, tps, c);
    }
  }
  for (const DecodeRow& r : rows) {
    std::printf("| mesh | %d | %.2f | %.2f | %.1f | %.1f | %.1f |\n", r.concurrency, r.tokens_per_s,
                r.decode_tokens_per_s, r.itl_ms, r.ttft_ms, r.tokens_per_step);
  }
  std::printf(
      "\nmesh decode phase (from every stream's first token on), per gateway step, ms: the "
      "gateway's busy time by stage, its wait for MoE results, and the workers' time inside "
      "expert FFNs (summed over workers)\n\n"
      "| streams | steps | step | attention | MoE call | dense FFN | LM head | other | MoE wait | "
      "workers' FFN |\n|---|---|---|---|---|---|---|---|---|---|\n");
  for (const DecodeRow& r : rows) {
    std::printf("| %d | %.0f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f |\n",
                r.concurrency, r.steps, r.step_ms, r.attention_ms, r.moe_call_ms, r.dense_ffn_ms,
                r.lm_head_ms, r.other_ms, r.wait_ms, r.workers_ms);
  }
  std::printf(
      "\nper MoE layer call of the decode phase, ms: the gateway's wait, the router's Forward "
      "(receipt to answer), a worker's RunExperts (receipt to computed: queue and FFN) and its "
      "FFN alone\n\n| streams | gateway wait | router Forward | worker calls per Forward | "
      "worker RunExperts | worker FFN |\n|---|---|---|---|---|---|\n");
  for (const DecodeRow& r : rows) {
    std::printf("| %d | %.2f | %.2f | %.2f | %.2f | %.2f |\n", r.concurrency,
                moe_layers > 0 ? r.wait_ms / moe_layers : 0.0, r.forward_call_ms,
                r.runs_per_forward, r.run_call_ms, r.ffn_call_ms);
  }
  if (inproc) {
    std::printf("\n| streams | mesh / single process (decode-phase tokens/s) |\n|---|---|\n");
    for (const DecodeRow& r : rows) {
      const double engine =
          r.concurrency == 1 ? inproc->decode_tps : inproc->batched_tps[r.concurrency];
      if (engine > 0) {
        std::printf("| %d | %.2f |\n", r.concurrency, r.decode_tokens_per_s / engine);
      }
    }
  }
  if (inproc && !rows.empty() && rows[0].concurrency == 1) {
    std::printf("\ngreedy tokens, mesh (1 stream) vs single process: %s\n",
                tokens_match ? "identical" : "DIFFERENT");
  }
  const double gr = wb.gateway_router, rw = wb.router_worker * wb.sends_per_token;
  std::printf("\n| wire, per token per MoE layer | bytes | from |\n|---|---|---|\n");
  std::printf(
      "| gateway <-> router (request + response) | %.0f | 2 x hidden %d x %d B + framing |\n", gr,
      cfg.hidden_size, dsize);
  std::printf(
      "| router <-> workers (request + response) | %.0f | %.2f groups visited (measured) x %.0f B "
      "|\n",
      rw, wb.sends_per_token, wb.router_worker);
  std::printf("| total | %.0f | x %d MoE layers = %.1f KB per token |\n", gr + rw, moe_layers,
              (gr + rw) * moe_layers / 1e3);

  j["mesh"] = {{"prefill_ttft_s", ttft_s},
               {"prefill_tokens_per_s", o.prompt / ttft_s},
               {"score_s", score_s},
               {"score_logits_bytes", 4.0 * o.prompt * cfg.vocab_size}};
  j["decode"] = nlohmann::json::array();
  for (const DecodeRow& r : rows) {
    j["decode"].push_back({{"concurrency", r.concurrency},
                           {"tokens", r.tokens},
                           {"wall_s", r.wall_s},
                           {"tokens_per_s", r.tokens_per_s},
                           {"decode_phase_tokens_per_s", r.decode_tokens_per_s},
                           {"inter_token_ms", r.itl_ms},
                           {"ttft_ms", r.ttft_ms},
                           {"tokens_per_step", r.tokens_per_step},
                           {"decode_phase_step_ms",
                            {{"steps", r.steps},
                             {"step", r.step_ms},
                             {"attention", r.attention_ms},
                             {"moe_call", r.moe_call_ms},
                             {"dense_ffn", r.dense_ffn_ms},
                             {"lm_head", r.lm_head_ms},
                             {"other", r.other_ms},
                             {"moe_wait", r.wait_ms},
                             {"workers_ffn", r.workers_ms}}},
                           {"decode_phase_call_ms",
                            {{"router_forward", r.forward_call_ms},
                             {"worker_run_experts", r.run_call_ms},
                             {"worker_ffn", r.ffn_call_ms},
                             {"worker_calls_per_forward", r.runs_per_forward}}}});
  }
  if (inproc) {
    j["greedy_tokens_match_inproc"] = tokens_match;
    j["inproc"]["decode"] = nlohmann::json::array();
    j["inproc"]["decode"].push_back({{"concurrency", 1}, {"tokens_per_s", inproc->decode_tps}});
    for (const auto& [c, tps] : inproc->batched_tps) {
      j["inproc"]["decode"].push_back({{"concurrency", c}, {"tokens_per_s", tps}});
    }
  }
  j["wire"] = {{"gateway_router_bytes_per_token_layer", gr},
               {"router_worker_bytes_per_send", wb.router_worker},
               {"sends_per_token_layer", wb.sends_per_token},
               {"router_worker_bytes_per_token_layer", rw},
               {"total_bytes_per_token", (gr + rw) * moe_layers}};
  j["work_dir"] = o.work_dir;
  if (!o.json.empty()) std::ofstream(o.json) << j.dump(2) << "\n";
  return 0;
}

}  // namespace
}  // namespace moemesh

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  auto options = moemesh::GetOptions();
  if (!options.ok()) {
    std::fprintf(stderr, "bench_mesh: %s\n", std::string(options.status().message()).c_str());
    return 2;
  }
  return moemesh::Run(*options);
}
