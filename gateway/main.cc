// moemesh-gateway: the front door and the dense half of the model.
//
//   moemesh-gateway --model DIR --router HOST:PORT [--port 0 --port_file F]
//
// Loads only the dense tensors (embeddings, attention, norms, LM head); every MoE layer is a
// call to the router. With --inproc it runs the experts in process instead (no router).
#include <cstdio>
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
ABSL_FLAG(int, max_queued, 1024, "waiting requests before RESOURCE_EXHAUSTED");
ABSL_FLAG(double, router_wait, 60, "seconds to wait for the router at start");
ABSL_FLAG(double, drain_seconds, 30, "grace period for in-flight requests on SIGTERM");
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

struct Options {
  std::string model, router, host, port_file;
  bool inproc = false;
  int top_k = 0, port = 0, metrics_port = -1;
  DType wire = DType::kF32;
  bool shared_in_gateway = false;
  SchedulerOptions sched;
  double router_wait = 60, drain_seconds = 30, not_serving_grace = 0;
  RemoteMoeLayerOptions remote;
  int max_receive_message_bytes = 4 << 20;
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
  o.sched.max_queued = absl::GetFlag(FLAGS_max_queued);
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
  if (o.router.empty() == !o.inproc)
    return absl::InvalidArgumentError("give exactly one of --router and --inproc");
  ASSIGN_OR_RETURN(const bool shared,
                   ParseSharedExpertsInGateway(absl::GetFlag(FLAGS_shared_experts)));
  o.shared_in_gateway = shared;
  ASSIGN_OR_RETURN(o.wire, ParseWireDType(absl::GetFlag(FLAGS_wire_dtype)));
  if (o.sched.max_step_tokens < 1 || o.sched.max_running < 1 || o.sched.max_queued < 1) {
    return absl::InvalidArgumentError(
        "--max_step_tokens, --max_running and --max_queued must be >= 1");
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
  };
  Scheduler scheduler(engine, sched);
  GatewayService service(&scheduler, cfg, std::move(tokenizer), &metrics);
  ServerHostOptions so;
  so.address = absl::StrCat(o.host, ":", o.port);
  so.port_file = o.port_file;
  so.max_receive_message_bytes = o.max_receive_message_bytes;
  ASSIGN_OR_RETURN(auto host, ServerHost::Start(so, {&service}));
  std::fprintf(stderr, "gateway: %s, %d layers, serving on %s\n",
               o.inproc ? "in-process experts" : o.router.c_str(), cfg.num_layers,
               host->address().c_str());
  const int sig = WaitForShutdownSignal();
  std::fprintf(stderr, "gateway: signal %d, draining\n", sig);
  host->Drain(absl::Seconds(o.drain_seconds), absl::Seconds(o.not_serving_grace));
  scheduler.Stop(false);
  return absl::OkStatus();
}

}  // namespace
}  // namespace moemesh::gateway

int main(int argc, char** argv) {
  return moemesh::ServiceMain("moemesh-gateway", argc, argv, moemesh::gateway::GetOptions,
                              moemesh::gateway::Run);
}
