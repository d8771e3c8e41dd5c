// moemesh-gateway: the front door and the dense half of the model.
//
//   moemesh-gateway --model DIR --router HOST:PORT [--port 0 --port_file F]
//
// Loads only the dense tensors (embeddings, attention, norms, LM head); every MoE layer is a
// call to the router. With --inproc it runs the experts in process instead (no router).
#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "gateway/api_keys.h"
#include "gateway/gateway_service.h"
#include "gateway/http_api.h"
#include "services/common/status_macros.h"
#include "services/compute/cpu/kernel_threads.h"
#include "services/compute/cpu/matmul.h"
#include "services/engine/engine.h"
#include "services/engine/inproc.h"
#include "services/engine/scheduler.h"
#include "services/moe/shared_experts_layer.h"
#include "services/rpc/remote_moe_layer.h"
#include "services/rpc/server_host.h"
#include "services/rpc/service_main.h"
#include "services/rpc/tensor_proto.h"
#include "services/rpc/tls.h"
#include "services/text/text_model.h"

ABSL_FLAG(std::string, model, "", "checkpoint directory");
ABSL_FLAG(std::string, router, "", "router address host:port");
ABSL_FLAG(bool, inproc, false, "run the experts in this process instead of calling a router");
ABSL_FLAG(int, top_k, 0, "experts per token (0: the config's); must match the router's");
ABSL_FLAG(std::string, shared_experts, "gateway",
          "where DeepSeek shared experts run: gateway (overlapped with the router call) | mesh "
          "(a worker group holds them); must match the router's (checked at start)");
ABSL_FLAG(std::string, wire_dtype, "bf16", "activation dtype to and from the router: f32 | bf16");
ABSL_FLAG(int64_t, blas_min_rows, 0,
          "products of at least this many rows go to OpenBLAS (faster prefill, but a request's "
          "logits then depend on what it is batched with); 0: never, every kernel is "
          "batch-invariant");
ABSL_FLAG(std::string, weights_dtype, "checkpoint",
          "dense weights in memory: checkpoint (as stored) | f32 | bf16 | f16");
ABSL_FLAG(std::string, host, "127.0.0.1", "address to listen on");
ABSL_FLAG(int, port, 0, "port (0 picks a free one)");
ABSL_FLAG(std::string, port_file, "", "write the bound port here once serving");
ABSL_FLAG(int, metrics_port, -1, "Prometheus /metrics port (-1: off, 0: pick one)");
ABSL_FLAG(int, max_step_tokens, 256, "prefill chunk budget per engine step");
ABSL_FLAG(int, micro_batches, 1,
          "split each step into this many micro-batches whose attention overlaps the others' "
          "MoE calls (1: one call per layer for the whole batch; 2: ping-pong; see "
          "--micro_batch_policy)");
ABSL_FLAG(std::string, micro_batch_policy, "adaptive",
          "with --micro_batches > 1: 'adaptive' runs each step whole or split, whichever has been "
          "faster per token for steps of its size (splitting re-reads the experts' weights, "
          "which costs when there is no latency to hide); 'always' splits every step");
ABSL_FLAG(int, kernel_threads, 0, "CPU kernel threads (0: one per CPU this process may run on)");
ABSL_FLAG(int, max_running, 64, "sequences batched together");
ABSL_FLAG(int, max_waiting, 1024, "waiting requests before RESOURCE_EXHAUSTED");
ABSL_FLAG(int, max_queued, -1, "deprecated name of --max_waiting");
ABSL_FLAG(int64_t, max_prompt_tokens, 0,
          "longest prompt accepted, else RESOURCE_EXHAUSTED (0: max_position_embeddings)");
ABSL_FLAG(int64_t, max_score_tokens, 4096,
          "longest Score accepted (it holds tokens x vocab F32 logits), else RESOURCE_EXHAUSTED");
ABSL_FLAG(int64_t, kv_cache_bytes, -1,
          "KV cache pool bound in bytes (-1: half the memory available at start)");
ABSL_FLAG(std::string, kv_cache_dtype, "f32", "KV cache dtype: f32 | bf16 (half the bytes)");
ABSL_FLAG(int, kv_block_tokens, 16, "tokens per KV cache block");
ABSL_FLAG(bool, prefix_caching, true, "share the KV blocks of common prompt prefixes");
ABSL_FLAG(double, router_wait, 60, "seconds to wait for the router at start");
ABSL_FLAG(double, drain_seconds, 30, "grace period for in-flight requests on SIGTERM");
ABSL_FLAG(std::string, chat_template, "",
          "a Jinja chat template file that replaces tokenizer_config.json's chat_template");
ABSL_FLAG(int64_t, max_prompt_bytes, int64_t{4} << 20,
          "longest text (prompt or rendered chat) the tokenizer accepts, in bytes; longer is "
          "INVALID_ARGUMENT before any work");
ABSL_FLAG(int, text_threads, 2, "threads that tokenize prompts and render chat templates");
ABSL_FLAG(int, http_port, -1,
          "OpenAI-compatible HTTP API port (-1: off, 0: pick a free one); HTTPS with --tls_cert");
ABSL_FLAG(std::string, http_port_file, "", "write the bound HTTP port here once serving");
ABSL_FLAG(int, http_threads, 64, "concurrent HTTP requests (each streaming one holds a thread)");
ABSL_FLAG(int64_t, max_body_bytes, int64_t{4} << 20, "largest HTTP request body (413 past it)");
ABSL_FLAG(std::string, served_model_name, "",
          "the model id of the HTTP API (default: the model directory's name)");
ABSL_FLAG(std::string, api_key_file, "",
          "require one of these keys (one per line; reread on SIGHUP) as 'Authorization: Bearer "
          "KEY' on HTTP and as 'authorization' metadata on gRPC");

ABSL_FLAG(std::string, tls_cert, "", "PEM certificate: serve TLS (and present it to peers)");
ABSL_FLAG(std::string, tls_key, "", "PEM private key of --tls_cert");
ABSL_FLAG(std::string, tls_ca, "",
          "PEM CA: require client certificates it signed (mTLS) and verify peers against it");
ABSL_FLAG(double, not_serving_grace, 0,
          "seconds between health turning NOT_SERVING on SIGTERM and refusing new calls (let "
          "probes and load balancers move traffic first)");
ABSL_FLAG(double, router_attempt_timeout, 30,
          "seconds per router call attempt; a failed or timed-out attempt is retried within "
          "the step's deadline");
ABSL_FLAG(int, router_max_attempts, 5, "attempts per router call (retries are backed off)");
ABSL_FLAG(double, default_deadline, 120,
          "deadline in seconds of an engine step whose requests carry none");
ABSL_FLAG(int, max_receive_message_bytes, 4 << 20,
          "largest request message accepted from clients (the public API)");

namespace moemesh::gateway {
namespace {

// The KV cache takes this fraction of the memory available when the gateway starts, unless
// --kv_cache_bytes says otherwise. The pool is backed lazily, so an idle gateway holds little.
constexpr double kDefaultKvCacheFraction = 0.5;

// Memory this process may still take: MemAvailable from /proc/meminfo, lowered to what the
// cgroup v2 limit leaves (memory.max - memory.current, as in a container with a memory
// limit); 4 GiB when neither can be read.
int64_t AvailableMemoryBytes() {
  int64_t available = -1;
  {
    std::ifstream in("/proc/meminfo");
    std::string key, unit;
    int64_t kib = 0;
    while (in >> key >> kib >> unit) {
      if (key == "MemAvailable:") {
        available = kib * 1024;
        break;
      }
    }
  }
  std::ifstream max_in("/sys/fs/cgroup/memory.max"), cur_in("/sys/fs/cgroup/memory.current");
  int64_t max = 0, current = 0;
  if ((max_in >> max) && (cur_in >> current) && max > current) {  // "max" fails to parse
    available = available < 0 ? max - current : std::min(available, max - current);
  }
  return available > 0 ? available : int64_t{4} << 30;
}

struct Options {
  std::string model, router, host, port_file;
  bool inproc = false;
  int top_k = 0, port = 0, metrics_port = -1;
  DType wire = DType::kBF16;
  std::optional<DType> weights_dtype;
  bool shared_in_gateway = false;
  SchedulerOptions sched;
  TextModelOptions text;
  int text_threads = 2;
  int http_port = -1, http_threads = 64;
  std::string http_port_file, served_model_name, api_key_file;
  size_t max_body_bytes = size_t{4} << 20;
  std::optional<TlsConfig> tls;
  double router_wait = 60, drain_seconds = 30, not_serving_grace = 0;
  RemoteMoeLayerOptions remote;
  int max_receive_message_bytes = 4 << 20;
  KvCacheOptions kv;
  int64_t blas_min_rows = 0;
  int micro_batches = 1;
  MicroBatchPolicy micro_batch_policy = MicroBatchPolicy::kAdaptive;
  int kernel_threads = 0;
};

absl::StatusOr<Options> GetOptions() {
  Options o;
  ASSIGN_OR_RETURN(o.tls, LoadTls({absl::GetFlag(FLAGS_tls_cert), absl::GetFlag(FLAGS_tls_key),
                                   absl::GetFlag(FLAGS_tls_ca)}));
  o.model = absl::GetFlag(FLAGS_model);
  o.router = absl::GetFlag(FLAGS_router);
  o.inproc = absl::GetFlag(FLAGS_inproc);
  o.top_k = absl::GetFlag(FLAGS_top_k);
  o.host = absl::GetFlag(FLAGS_host);
  o.port = absl::GetFlag(FLAGS_port);
  o.port_file = absl::GetFlag(FLAGS_port_file);
  o.metrics_port = absl::GetFlag(FLAGS_metrics_port);
  o.sched.max_step_tokens = absl::GetFlag(FLAGS_max_step_tokens);
  o.sched.max_running = absl::GetFlag(FLAGS_max_running);
  o.sched.max_waiting = absl::GetFlag(FLAGS_max_queued) >= 0 ? absl::GetFlag(FLAGS_max_queued)
                                                             : absl::GetFlag(FLAGS_max_waiting);
  o.sched.max_prompt_tokens = absl::GetFlag(FLAGS_max_prompt_tokens);
  o.sched.max_score_tokens = absl::GetFlag(FLAGS_max_score_tokens);
  o.kv.bytes = absl::GetFlag(FLAGS_kv_cache_bytes);
  if (o.kv.bytes < 0) {
    o.kv.bytes = static_cast<int64_t>(kDefaultKvCacheFraction * AvailableMemoryBytes());
  }
  ASSIGN_OR_RETURN(o.kv.dtype, ParseKvCacheDType(absl::GetFlag(FLAGS_kv_cache_dtype)));
  o.kv.block_tokens = absl::GetFlag(FLAGS_kv_block_tokens);
  o.kv.prefix_caching = absl::GetFlag(FLAGS_prefix_caching);
  o.router_wait = absl::GetFlag(FLAGS_router_wait);
  o.drain_seconds = absl::GetFlag(FLAGS_drain_seconds);
  o.not_serving_grace = absl::GetFlag(FLAGS_not_serving_grace);
  o.remote.attempt_timeout = absl::Seconds(absl::GetFlag(FLAGS_router_attempt_timeout));
  o.remote.max_attempts = absl::GetFlag(FLAGS_router_max_attempts);
  o.remote.default_deadline = absl::Seconds(absl::GetFlag(FLAGS_default_deadline));
  o.max_receive_message_bytes = absl::GetFlag(FLAGS_max_receive_message_bytes);
  if (o.not_serving_grace < 0 || o.drain_seconds < 0)
    return absl::InvalidArgumentError("--not_serving_grace and --drain_seconds must be >= 0");
  if (o.remote.attempt_timeout <= absl::ZeroDuration() ||
      o.remote.default_deadline <= absl::ZeroDuration() || o.remote.max_attempts < 1) {
    return absl::InvalidArgumentError(
        "--router_attempt_timeout and --default_deadline must be > 0, --router_max_attempts >= 1");
  }
  if (o.max_receive_message_bytes < 1024)
    return absl::InvalidArgumentError("--max_receive_message_bytes must be >= 1024");
  if (o.model.empty()) return absl::InvalidArgumentError("--model is required");
  if (const std::string f = absl::GetFlag(FLAGS_chat_template); !f.empty()) {
    std::ifstream in(f, std::ios::binary);
    if (!in) return absl::InvalidArgumentError(absl::StrCat("cannot read --chat_template ", f));
    std::stringstream ss;
    ss << in.rdbuf();
    o.text.chat_template_override = ss.str();
    if (o.text.chat_template_override.empty())
      return absl::InvalidArgumentError(absl::StrCat("--chat_template ", f, " is empty"));
  }
  if (absl::GetFlag(FLAGS_max_prompt_bytes) < 1)
    return absl::InvalidArgumentError("--max_prompt_bytes must be >= 1");
  o.text.tokenizer.max_input_bytes = static_cast<size_t>(absl::GetFlag(FLAGS_max_prompt_bytes));
  o.text_threads = absl::GetFlag(FLAGS_text_threads);
  o.http_port = absl::GetFlag(FLAGS_http_port);
  o.http_port_file = absl::GetFlag(FLAGS_http_port_file);
  o.http_threads = absl::GetFlag(FLAGS_http_threads);
  o.api_key_file = absl::GetFlag(FLAGS_api_key_file);
  if (absl::GetFlag(FLAGS_max_body_bytes) < 1024)
    return absl::InvalidArgumentError("--max_body_bytes must be >= 1024");
  o.max_body_bytes = static_cast<size_t>(absl::GetFlag(FLAGS_max_body_bytes));
  if (o.http_port < -1 || o.http_port > 65535)
    return absl::InvalidArgumentError("--http_port must be -1 (off), 0 (any) or a port");
  if (o.http_threads < 1) return absl::InvalidArgumentError("--http_threads must be >= 1");
  o.served_model_name = absl::GetFlag(FLAGS_served_model_name);
  if (o.served_model_name.empty()) {
    std::string m = o.model;
    while (m.size() > 1 && m.back() == '/') m.pop_back();
    o.served_model_name = m.substr(m.rfind('/') + 1);
  }
  if (o.text_threads < 1) return absl::InvalidArgumentError("--text_threads must be >= 1");
  if (o.router.empty() == !o.inproc)
    return absl::InvalidArgumentError("give exactly one of --router and --inproc");
  ASSIGN_OR_RETURN(const bool shared,
                   ParseSharedExpertsInGateway(absl::GetFlag(FLAGS_shared_experts)));
  o.shared_in_gateway = shared;
  ASSIGN_OR_RETURN(o.wire, ParseWireDType(absl::GetFlag(FLAGS_wire_dtype)));
  ASSIGN_OR_RETURN(o.weights_dtype, ParseWeightsDType(absl::GetFlag(FLAGS_weights_dtype)));
  o.blas_min_rows = absl::GetFlag(FLAGS_blas_min_rows);
  if (o.blas_min_rows < 0) return absl::InvalidArgumentError("--blas_min_rows must be >= 0");
  o.micro_batches = absl::GetFlag(FLAGS_micro_batches);
  if (o.micro_batches < 1 || o.micro_batches > 8)
    return absl::InvalidArgumentError("--micro_batches must be in 1..8");
  if (const std::string p = absl::GetFlag(FLAGS_micro_batch_policy); p == "adaptive") {
    o.micro_batch_policy = MicroBatchPolicy::kAdaptive;
  } else if (p == "always") {
    o.micro_batch_policy = MicroBatchPolicy::kAlways;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("--micro_batch_policy must be adaptive or always, got '", p, "'"));
  }
  o.kernel_threads = absl::GetFlag(FLAGS_kernel_threads);
  if (o.kernel_threads < 0) return absl::InvalidArgumentError("--kernel_threads must be >= 0");
  if (o.sched.max_step_tokens < 1 || o.sched.max_running < 1 || o.sched.max_waiting < 1 ||
      o.sched.max_score_tokens < 1) {
    return absl::InvalidArgumentError(
        "--max_step_tokens, --max_running, --max_waiting and --max_score_tokens must be >= 1");
  }
  if (o.sched.max_prompt_tokens < 0) {
    return absl::InvalidArgumentError("--max_prompt_tokens must be >= 0");
  }
  if (o.kv.bytes < 1) {
    return absl::InvalidArgumentError("--kv_cache_bytes must be positive");
  }
  if (o.kv.block_tokens < 1 || o.kv.block_tokens > 4096) {
    return absl::InvalidArgumentError("--kv_block_tokens must be in 1..4096");
  }
  return o;
}

// SIGHUP rereads the API key file, on a thread of its own (the handler only writes a byte).
int g_hup_pipe[2] = {-1, -1};

void OnHup(int) {
  const char c = 1;
  [[maybe_unused]] ssize_t n = ::write(g_hup_pipe[1], &c, 1);
}

void ReloadOnSighup(ApiKeys* keys) {
  if (::pipe2(g_hup_pipe, O_CLOEXEC) != 0) return;
  struct sigaction sa = {};
  sa.sa_handler = OnHup;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  ::sigaction(SIGHUP, &sa, nullptr);
  std::thread([keys] {
    char c;
    while (::read(g_hup_pipe[0], &c, 1) == 1) {
      if (absl::Status s = keys->Reload(); !s.ok()) {
        std::fprintf(stderr, "gateway: SIGHUP: keeping the previous API keys: %s\n",
                     std::string(s.message()).c_str());
      } else {
        std::fprintf(stderr, "gateway: SIGHUP: API keys reread\n");
      }
    }
  }).detach();
}

absl::Status Run(const Options& o) {
  cpu::set_blas_min_rows(o.blas_min_rows);  // before any kernel runs
  if (o.kernel_threads > 0) cpu::KernelThreads::SetThreads(o.kernel_threads);
  SetClientTls(o.tls);  // before any channel: every outgoing connection uses it
  std::unique_ptr<InprocModel> inproc;
  std::unique_ptr<Checkpoint> ckpt;
  std::unique_ptr<ComputeBackend> backend;
  std::unique_ptr<RemoteMoeLayer> remote;
  std::unique_ptr<SharedExpertsLayer> shared_layer;
  std::unique_ptr<Engine> engine_owned;
  Engine* engine = nullptr;
  ModelConfig cfg;
  if (o.inproc) {
    ASSIGN_OR_RETURN(inproc,
                     InprocModel::Load(o.model, InprocOptions{1, o.top_k, o.weights_dtype}));
    engine = inproc->engine.get();
    cfg = inproc->config;
  } else {
    ASSIGN_OR_RETURN(cfg, LoadModelConfig(o.model));
    RETURN_IF_ERROR(ApplyTopKOverride(o.top_k, &cfg));
    ASSIGN_OR_RETURN(ckpt, OpenModelCheckpoint(o.model, cfg, o.weights_dtype));
    backend = MakeCpuBackend();
    remote = std::make_unique<RemoteMoeLayer>(o.router, o.wire, o.remote);
    if (!remote->WaitForReady(absl::Seconds(o.router_wait))) {
      return absl::UnavailableError(absl::StrCat("router ", o.router, " is not reachable"));
    }
    ASSIGN_OR_RETURN(v1::TopologyResponse topo, remote->Topology(absl::Seconds(o.router_wait)));
    if (cfg.n_shared_experts > 0 && topo.dispatches_shared_experts() == o.shared_in_gateway) {
      return absl::FailedPreconditionError(absl::StrCat(
          "shared experts would be ", o.shared_in_gateway ? "computed twice" : "skipped",
          ": this gateway has --shared_experts=", o.shared_in_gateway ? "gateway" : "mesh",
          " but the router ", topo.dispatches_shared_experts() ? "dispatches" : "does not dispatch",
          " them; give both the same --shared_experts"));
    }
    MoeLayer* moe = remote.get();
    if (o.shared_in_gateway && cfg.n_shared_experts > 0) {
      std::vector<ExpertKey> keys;
      for (int layer : cfg.MoeLayers()) keys.push_back({layer, kSharedExpertId});
      ASSIGN_OR_RETURN(auto group,
                       LocalExpertGroup::Load(*ckpt, cfg, keys, backend.get(), "gateway-shared"));
      shared_layer = std::make_unique<SharedExpertsLayer>(remote.get(), std::move(group));
      moe = shared_layer.get();
    }
    ASSIGN_OR_RETURN(engine_owned, Engine::Load(*ckpt, cfg, backend.get(), moe));
    engine = engine_owned.get();
  }
  RETURN_IF_ERROR(engine->ConfigureKvCache(o.kv));
  RETURN_IF_ERROR(engine->set_micro_batches(o.micro_batches));
  engine->set_micro_batch_policy(o.micro_batch_policy);
  std::fprintf(stderr, "gateway: KV cache of %lld bytes (%lld blocks of %d tokens, %s)\n",
               static_cast<long long>(o.kv.bytes),
               static_cast<long long>(engine->kv_cache().total_blocks()), o.kv.block_tokens,
               o.kv.dtype == DType::kBF16 ? "bf16" : "f32");
  ASSIGN_OR_RETURN(std::shared_ptr<const TextModel> text, TextModel::LoadDir(o.model, o.text));
  ApiKeys keys;
  if (!o.api_key_file.empty()) RETURN_IF_ERROR(keys.Load(o.api_key_file));
  Metrics metrics("gateway");
  if (o.metrics_port >= 0) {
    ASSIGN_OR_RETURN(int mport, metrics.Serve(absl::StrCat(o.host, ":", o.metrics_port)));
    std::fprintf(stderr, "gateway: metrics on %s:%d\n", o.host.c_str(), mport);
  }
  SchedulerOptions sched = o.sched;
  sched.on_step = [&metrics, engine, last = StepProfile()](const StepInfo& s) mutable {
    if (s.sequences > 0) metrics.ObserveStep(s.seconds, s.tokens);
    const StepProfile now = engine->profile();
    metrics.AddGatewayTime(now.busy_s() - last.busy_s(), now.moe_wait_s - last.moe_wait_s);
    metrics.AddGatewayStageTime("attention", now.attention_s - last.attention_s);
    metrics.AddGatewayStageTime("moe_call", now.moe_call_s - last.moe_call_s);
    metrics.AddGatewayStageTime("dense_ffn", now.dense_ffn_s - last.dense_ffn_s);
    metrics.AddGatewayStageTime("lm_head", now.lm_head_s - last.lm_head_s);
    metrics.AddGatewayStageTime("other", now.other_s() - last.other_s());
    for (int kind = 0; kind < 2; ++kind) {
      for (int parts = 1; parts <= 8; ++parts) {
        metrics.AddSteps(kind == 0, parts, now.by_parts[kind][parts] - last.by_parts[kind][parts]);
      }
    }
    last = now;
    metrics.SetRunning(s.running);
    metrics.SetQueueDepth(s.queued);
    metrics.ObserveKvCache(s.kv.used_blocks, s.kv.cached_blocks, s.kv.total_blocks, s.preempted,
                           s.prefix_query_tokens, s.prefix_hit_tokens);
  };
  Scheduler scheduler(engine, sched);
  TextGenerator generator(&scheduler, std::move(text), &metrics, o.text_threads);
  GatewayService service(&scheduler, cfg, &generator, &metrics, &keys);
  ServerHostOptions so;
  so.address = absl::StrCat(o.host, ":", o.port);
  so.credentials = ServerCredentials(o.tls);
  so.port_file = o.port_file;
  so.max_receive_message_bytes = o.max_receive_message_bytes;
  ASSIGN_OR_RETURN(auto host, ServerHost::Start(so, {&service}));
  std::fprintf(stderr, "gateway: %s, %d layers, serving on %s\n",
               o.inproc ? "in-process experts" : o.router.c_str(), cfg.num_layers,
               host->address().c_str());
  std::unique_ptr<HttpApi> http;
  if (o.http_port >= 0) {
    HttpApiOptions ho;
    ho.host = o.host;
    ho.port = o.http_port;
    ho.served_model_name = o.served_model_name;
    ho.max_body_bytes = o.max_body_bytes;
    ho.threads = o.http_threads;
    ho.keys = &keys;
    // HTTPS with the service certificate; OpenAI clients authenticate with API keys, not
    // client certificates.
    ho.tls_cert = absl::GetFlag(FLAGS_tls_cert);
    ho.tls_key = absl::GetFlag(FLAGS_tls_key);
    ho.max_model_len = cfg.max_position_embeddings;
    RemoteMoeLayer* router = remote.get();
    ho.healthy = [router] { return router == nullptr || router->IsReady(); };
    ASSIGN_OR_RETURN(http, HttpApi::Start(ho, &generator, &metrics));
    std::fprintf(stderr, "gateway: OpenAI-compatible HTTP API on %s:%d (model '%s')\n",
                 o.host.c_str(), http->port(), o.served_model_name.c_str());
    if (!o.http_port_file.empty()) {
      std::ofstream(o.http_port_file + ".tmp") << http->port() << "\n";
      std::rename((o.http_port_file + ".tmp").c_str(), o.http_port_file.c_str());
    }
  }
  ReloadOnSighup(&keys);
  const int sig = WaitForShutdownSignal();
  std::fprintf(stderr, "gateway: signal %d, draining\n", sig);
  if (http) http->SetDraining();
  host->Drain(absl::Seconds(o.drain_seconds), absl::Seconds(o.not_serving_grace));
  if (http) http->Stop();
  scheduler.Stop(false);
  return absl::OkStatus();
}

}  // namespace
}  // namespace moemesh::gateway

int main(int argc, char** argv) {
  return moemesh::ServiceMain("moemesh-gateway", argc, argv, moemesh::gateway::GetOptions,
                              moemesh::gateway::Run);
}
