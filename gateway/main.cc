// moemesh-gateway: the front door and the dense half of the model.
//
//   moemesh-gateway --model DIR --router HOST:PORT [--port 0 --port_file F]
//
// Loads only the dense tensors (embeddings, attention, norms, LM head); every MoE layer is a
// call to the router. With --inproc it runs the experts in process instead (no router).
#include <algorithm>
#include <cstdio>
#include <fstream>
#include <optional>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "gateway/gateway_service.h"
#include "services/common/status_macros.h"
#include "services/engine/engine.h"
#include "services/engine/inproc.h"
#include "services/engine/scheduler.h"
#include "services/moe/shared_experts_layer.h"
#include "services/rpc/remote_moe_layer.h"
#include "services/rpc/server_host.h"
#include "services/rpc/service_main.h"
#include "services/rpc/tensor_proto.h"

ABSL_FLAG(std::string, model, "", "checkpoint directory");
ABSL_FLAG(std::string, router, "", "router address host:port");
ABSL_FLAG(bool, inproc, false, "run the experts in this process instead of calling a router");
ABSL_FLAG(int, top_k, 0, "experts per token (0: the config's); must match the router's");
ABSL_FLAG(std::string, shared_experts, "gateway",
          "where DeepSeek shared experts run: gateway (overlapped with the router call) | mesh "
          "(a worker group holds them); must match the router's (checked at start)");
ABSL_FLAG(std::string, wire_dtype, "f32", "activation dtype to and from the router: f32 | bf16");
ABSL_FLAG(std::string, host, "127.0.0.1", "address to listen on");
ABSL_FLAG(int, port, 0, "port (0 picks a free one)");
ABSL_FLAG(std::string, port_file, "", "write the bound port here once serving");
ABSL_FLAG(int, metrics_port, -1, "Prometheus /metrics port (-1: off, 0: pick one)");
ABSL_FLAG(int, max_step_tokens, 256, "prefill chunk budget per engine step");
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
  DType wire = DType::kF32;
  bool shared_in_gateway = false;
  SchedulerOptions sched;
  KvCacheOptions kv;
  double router_wait = 60, drain_seconds = 30;
};

absl::StatusOr<Options> GetOptions() {
  Options o;
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
  if (o.model.empty()) return absl::InvalidArgumentError("--model is required");
  if (o.router.empty() == !o.inproc)
    return absl::InvalidArgumentError("give exactly one of --router and --inproc");
  ASSIGN_OR_RETURN(const bool shared,
                   ParseSharedExpertsInGateway(absl::GetFlag(FLAGS_shared_experts)));
  o.shared_in_gateway = shared;
  ASSIGN_OR_RETURN(o.wire, ParseWireDType(absl::GetFlag(FLAGS_wire_dtype)));
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

absl::Status Run(const Options& o) {
  std::unique_ptr<InprocModel> inproc;
  std::unique_ptr<Checkpoint> ckpt;
  std::unique_ptr<ComputeBackend> backend;
  std::unique_ptr<RemoteMoeLayer> remote;
  std::unique_ptr<SharedExpertsLayer> shared_layer;
  std::unique_ptr<Engine> engine_owned;
  Engine* engine = nullptr;
  ModelConfig cfg;
  if (o.inproc) {
    ASSIGN_OR_RETURN(inproc, InprocModel::Load(o.model, InprocOptions{1, o.top_k}));
    engine = inproc->engine.get();
    cfg = inproc->config;
  } else {
    ASSIGN_OR_RETURN(cfg, LoadModelConfig(o.model));
    RETURN_IF_ERROR(ApplyTopKOverride(o.top_k, &cfg));
    ASSIGN_OR_RETURN(ckpt, OpenModelCheckpoint(o.model, cfg));
    backend = MakeCpuBackend();
    remote = std::make_unique<RemoteMoeLayer>(o.router, o.wire);
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
  std::fprintf(stderr, "gateway: KV cache of %lld bytes (%lld blocks of %d tokens, %s)\n",
               static_cast<long long>(o.kv.bytes),
               static_cast<long long>(engine->kv_cache().total_blocks()), o.kv.block_tokens,
               o.kv.dtype == DType::kBF16 ? "bf16" : "f32");
  std::optional<Tokenizer> tokenizer;
  if (auto t = Tokenizer::Load(o.model + "/tokenizer.json"); t.ok()) tokenizer = *std::move(t);
  Metrics metrics("gateway");
  if (o.metrics_port >= 0) {
    ASSIGN_OR_RETURN(int mport, metrics.Serve(absl::StrCat(o.host, ":", o.metrics_port)));
    std::fprintf(stderr, "gateway: metrics on %s:%d\n", o.host.c_str(), mport);
  }
  SchedulerOptions sched = o.sched;
  sched.on_step = [&metrics](const StepInfo& s) {
    metrics.ObserveStep(s.seconds, s.tokens);
    metrics.SetRunning(s.running);
    metrics.SetQueueDepth(s.queued);
    metrics.ObserveKvCache(s.kv.used_blocks, s.kv.cached_blocks, s.kv.total_blocks, s.preempted,
                           s.prefix_query_tokens, s.prefix_hit_tokens);
  };
  Scheduler scheduler(engine, sched);
  GatewayService service(&scheduler, cfg, std::move(tokenizer), &metrics);
  ServerHostOptions so;
  so.address = absl::StrCat(o.host, ":", o.port);
  so.port_file = o.port_file;
  ASSIGN_OR_RETURN(auto host, ServerHost::Start(so, {&service}));
  std::fprintf(stderr, "gateway: %s, %d layers, serving on %s\n",
               o.inproc ? "in-process experts" : o.router.c_str(), cfg.num_layers,
               host->address().c_str());
  const int sig = WaitForShutdownSignal();
  std::fprintf(stderr, "gateway: signal %d, draining\n", sig);
  host->Drain(absl::Seconds(o.drain_seconds));
  scheduler.Stop(false);
  return absl::OkStatus();
}

}  // namespace
}  // namespace moemesh::gateway

int main(int argc, char** argv) {
  return moemesh::ServiceMain("moemesh-gateway", argc, argv, moemesh::gateway::GetOptions,
                              moemesh::gateway::Run);
}
