// moemesh-router: gating and dispatch for every MoE layer of a model.
//
//   moemesh-router --model DIR --groups 'host:p1|host:p2,host:p3' [--port 0 --port_file F]
//
// --groups lists expert groups separated by ',', and the replicas of a group by '|'. A group
// may also be a DNS target (dns:///name:port), balanced round-robin by gRPC. At start the
// router asks every replica what it holds (Describe) and refuses to serve unless every
// expert of every MoE layer is held by some group.
#include <cstdio>
#include <optional>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "router/router_service.h"
#include "services/common/status_macros.h"
#include "services/engine/inproc.h"
#include "services/model/config.h"
#include "services/model/safetensors.h"
#include "services/moe/local_expert_group.h"
#include "services/rpc/server_host.h"
#include "services/rpc/service_main.h"
#include "services/rpc/tensor_proto.h"
#include "services/rpc/tls.h"

ABSL_FLAG(std::string, model, "", "checkpoint directory (config and gate weights are read)");
ABSL_FLAG(std::string, groups, "", "expert groups: ',' between groups, '|' between replicas");
ABSL_FLAG(int, top_k, 0, "experts per token (0: the config's num_experts_per_tok)");
ABSL_FLAG(std::string, shared_experts, "gateway",
          "where DeepSeek shared experts run: gateway (the router leaves them out) | mesh (a "
          "worker group holds them and every token visits it)");
ABSL_FLAG(std::string, wire_dtype, "f32", "activation dtype to and from workers: f32 | bf16");
ABSL_FLAG(std::string, host, "127.0.0.1", "address to listen on");
ABSL_FLAG(int, port, 0, "port (0 picks a free one)");
ABSL_FLAG(std::string, port_file, "", "write the bound port here once serving");
ABSL_FLAG(int, metrics_port, -1, "Prometheus /metrics port (-1: off, 0: pick one)");
ABSL_FLAG(int, threads, 2, "gating threads");
ABSL_FLAG(int, max_queue, 1024, "queued calls before RESOURCE_EXHAUSTED");
ABSL_FLAG(double, attempt_timeout, 30,
          "seconds per worker call attempt before trying another replica");
ABSL_FLAG(double, startup_timeout, 60, "seconds to wait for workers to answer Describe");
ABSL_FLAG(double, drain_seconds, 10, "grace period for in-flight calls on SIGTERM");

ABSL_FLAG(std::string, tls_cert, "", "PEM certificate: serve TLS (and present it to peers)");
ABSL_FLAG(std::string, tls_key, "", "PEM private key of --tls_cert");
ABSL_FLAG(std::string, tls_ca, "",
          "PEM CA: require client certificates it signed (mTLS) and verify peers against it");

namespace moemesh::router {
namespace {

struct Options {
  std::string model, host, port_file;
  std::vector<std::vector<std::string>> groups;
  int top_k = 0, port = 0, metrics_port = -1, threads = 2, max_queue = 1024;
  DType wire = DType::kF32;
  bool dispatch_shared = true;
  double attempt_timeout = 30, startup_timeout = 60, drain_seconds = 10;
  std::optional<TlsConfig> tls;
};

absl::StatusOr<Options> GetOptions() {
  Options o;
  ASSIGN_OR_RETURN(o.tls, LoadTls({absl::GetFlag(FLAGS_tls_cert), absl::GetFlag(FLAGS_tls_key),
                                   absl::GetFlag(FLAGS_tls_ca)}));
  o.model = absl::GetFlag(FLAGS_model);
  o.host = absl::GetFlag(FLAGS_host);
  o.port = absl::GetFlag(FLAGS_port);
  o.port_file = absl::GetFlag(FLAGS_port_file);
  o.metrics_port = absl::GetFlag(FLAGS_metrics_port);
  o.top_k = absl::GetFlag(FLAGS_top_k);
  o.threads = absl::GetFlag(FLAGS_threads);
  o.max_queue = absl::GetFlag(FLAGS_max_queue);
  o.attempt_timeout = absl::GetFlag(FLAGS_attempt_timeout);
  o.startup_timeout = absl::GetFlag(FLAGS_startup_timeout);
  o.drain_seconds = absl::GetFlag(FLAGS_drain_seconds);
  if (o.model.empty()) return absl::InvalidArgumentError("--model is required");
  for (absl::string_view g :
       absl::StrSplit(absl::GetFlag(FLAGS_groups), ',', absl::SkipWhitespace())) {
    std::vector<std::string> replicas = absl::StrSplit(g, '|', absl::SkipWhitespace());
    if (replicas.empty()) return absl::InvalidArgumentError("--groups has an empty group");
    o.groups.push_back(std::move(replicas));
  }
  if (o.groups.empty()) return absl::InvalidArgumentError("--groups is required");
  ASSIGN_OR_RETURN(const bool shared,
                   ParseSharedExpertsInGateway(absl::GetFlag(FLAGS_shared_experts)));
  o.dispatch_shared = !shared;
  ASSIGN_OR_RETURN(o.wire, ParseWireDType(absl::GetFlag(FLAGS_wire_dtype)));
  if (o.attempt_timeout <= 0 || o.startup_timeout <= 0)
    return absl::InvalidArgumentError("timeouts must be positive");
  return o;
}

absl::Status Run(const Options& o) {
  SetClientTls(o.tls);  // before any channel: every outgoing connection uses it
  ASSIGN_OR_RETURN(ModelConfig cfg, LoadModelConfig(o.model));
  RETURN_IF_ERROR(ApplyTopKOverride(o.top_k, &cfg));
  ASSIGN_OR_RETURN(auto ckpt, OpenModelCheckpoint(o.model, cfg));
  ASSIGN_OR_RETURN(auto gates, MoeDispatcher::LoadGates(*ckpt, cfg));
  Metrics metrics("router");
  std::vector<MoeDispatcher::GroupEntry> entries;
  std::vector<std::shared_ptr<ReplicaSet>> sets;
  for (size_t g = 0; g < o.groups.size(); ++g) {
    std::vector<std::shared_ptr<GrpcExpertGroup>> replicas;
    std::vector<ExpertKey> holds;
    for (size_t r = 0; r < o.groups[g].size(); ++r) {
      auto rep = std::make_shared<GrpcExpertGroup>(o.groups[g][r], o.wire);
      ASSIGN_OR_RETURN(v1::DescribeResponse d, rep->Describe(absl::Seconds(o.startup_timeout)),
                       "group ", g);
      if (d.hidden_size() != cfg.hidden_size) {
        return absl::FailedPreconditionError(absl::StrCat(o.groups[g][r], " serves hidden size ",
                                                          d.hidden_size(), ", the model has ",
                                                          cfg.hidden_size));
      }
      std::vector<ExpertKey> these;
      for (const auto& s : d.experts()) these.push_back({s.layer(), s.expert()});
      std::sort(these.begin(), these.end());
      if (r == 0) {
        holds = these;
      } else if (these != holds) {
        return absl::FailedPreconditionError(
            absl::StrCat("replicas of group ", g, " hold different experts: ", o.groups[g][0],
                         " and ", o.groups[g][r]));
      }
      replicas.push_back(std::move(rep));
    }
    ReplicaSetOptions ro;
    ro.attempt_timeout = absl::Seconds(o.attempt_timeout);
    ro.group_index = static_cast<int>(g);
    auto set = std::make_shared<ReplicaSet>(std::move(replicas), ro, &metrics);
    sets.push_back(set);
    entries.push_back({set, holds});
  }
  auto backend = MakeCpuBackend();
  ASSIGN_OR_RETURN(auto dispatcher, MoeDispatcher::Create(cfg, std::move(gates), std::move(entries),
                                                          backend.get(), o.dispatch_shared));
  if (o.metrics_port >= 0) {
    ASSIGN_OR_RETURN(int mport, metrics.Serve(absl::StrCat(o.host, ":", o.metrics_port)));
    std::fprintf(stderr, "router: metrics on %s:%d\n", o.host.c_str(), mport);
  }
  RouterService service(std::move(dispatcher), sets, o.threads, o.max_queue, &metrics);
  ServerHostOptions so;
  so.address = absl::StrCat(o.host, ":", o.port);
  so.credentials = ServerCredentials(o.tls);
  so.port_file = o.port_file;
  ASSIGN_OR_RETURN(auto host, ServerHost::Start(so, {&service}));
  std::fprintf(stderr, "router: %zu groups, top-%d of %d experts, serving on %s\n", sets.size(),
               cfg.top_k, cfg.num_experts, host->address().c_str());
  const int sig = WaitForShutdownSignal();
  std::fprintf(stderr, "router: signal %d, draining\n", sig);
  host->Drain(absl::Seconds(o.drain_seconds));
  return absl::OkStatus();
}

}  // namespace
}  // namespace moemesh::router

int main(int argc, char** argv) {
  return moemesh::ServiceMain("moemesh-router", argc, argv, moemesh::router::GetOptions,
                              moemesh::router::Run);
}
