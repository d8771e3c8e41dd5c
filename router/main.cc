// moemesh-router: gating and dispatch for every MoE layer of a model.
//
//   moemesh-router --model DIR --groups 'host:p1|host:p2,host:p3' [--port 0 --port_file F]
//
// --groups lists expert groups separated by ',' (or by ';', which then is the only group
// separator, so that a group can be an ipv4:a:p1,b:p2 list), and the replicas of a group by
// '|'. A replica may also be a multi-address target (dns:///name:port, the headless Service
// of a group, or ipv4:a:p1,b:p2), balanced round-robin by gRPC and retried on another of its
// addresses. At start the router asks every replica what it holds (Describe) and serves as
// soon as every group has at least one replica that answered, for up to --startup_timeout;
// it refuses to serve unless every expert of every MoE layer is held by some group.
// Replicas that did not answer are probed in the background and join when they answer with
// the group's experts; until then the group is degraded (Topology marks the replica not
// ready, health service "moemesh.router.all_replicas_ready" is NOT_SERVING, the gauge
// moemesh_group_replicas{state="down"} counts it, the log says so).
#include <atomic>
#include <cstdio>
#include <optional>
#include <string>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/match.h"
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
ABSL_FLAG(std::string, wire_dtype, "bf16", "activation dtype to and from workers: f32 | bf16");
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
ABSL_FLAG(double, not_serving_grace, 0,
          "seconds between health turning NOT_SERVING on SIGTERM and refusing new calls");
ABSL_FLAG(double, probe_interval, 1, "seconds between Describe probes of replicas not ready");

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
  DType wire = DType::kBF16;
  bool dispatch_shared = true;
  double attempt_timeout = 30, startup_timeout = 60, drain_seconds = 10, not_serving_grace = 0;
  double probe_interval = 1;
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
  o.not_serving_grace = absl::GetFlag(FLAGS_not_serving_grace);
  o.probe_interval = absl::GetFlag(FLAGS_probe_interval);
  if (o.not_serving_grace < 0 || o.drain_seconds < 0 || o.probe_interval <= 0) {
    return absl::InvalidArgumentError(
        "--not_serving_grace and --drain_seconds must be >= 0, --probe_interval > 0");
  }
  if (o.model.empty()) return absl::InvalidArgumentError("--model is required");
  const std::string groups_flag = absl::GetFlag(FLAGS_groups);
  const char group_sep = absl::StrContains(groups_flag, ';') ? ';' : ',';
  for (absl::string_view g : absl::StrSplit(groups_flag, group_sep, absl::SkipWhitespace())) {
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
  // Describe every replica, round after round, until each group has one that answered (the
  // first answer fixes what the group holds) or the startup timeout passes.
  struct Replica {
    std::shared_ptr<GrpcExpertGroup> client;
    bool ready = false;
  };
  std::vector<std::vector<Replica>> reps(o.groups.size());
  std::vector<std::optional<std::vector<ExpertKey>>> holds(o.groups.size());
  for (size_t g = 0; g < o.groups.size(); ++g) {
    for (const std::string& target : o.groups[g]) {
      reps[g].push_back({std::make_shared<GrpcExpertGroup>(target, o.wire), false});
    }
  }
  // Checks one replica's Describe against the model and its group; OK once it may serve.
  auto check = [&](size_t g, size_t r, absl::Duration timeout) -> absl::Status {
    ASSIGN_OR_RETURN(v1::DescribeResponse d, reps[g][r].client->Describe(timeout), "group ", g);
    if (d.hidden_size() != cfg.hidden_size) {
      return absl::FailedPreconditionError(absl::StrCat(o.groups[g][r], " serves hidden size ",
                                                        d.hidden_size(), ", the model has ",
                                                        cfg.hidden_size));
    }
    std::vector<ExpertKey> these;
    for (const auto& s : d.experts()) these.push_back({s.layer(), s.expert()});
    std::sort(these.begin(), these.end());
    if (!holds[g].has_value()) {
      holds[g] = these;
    } else if (these != *holds[g]) {
      return absl::FailedPreconditionError(
          absl::StrCat("replicas of group ", g, " hold different experts: ", o.groups[g][r],
                       " differs from the group's first replica to answer"));
    }
    return absl::OkStatus();
  };
  const absl::Time startup_deadline = absl::Now() + absl::Seconds(o.startup_timeout);
  for (bool first_round = true;; first_round = false) {
    bool all_groups = true;
    for (size_t g = 0; g < o.groups.size(); ++g) {
      for (size_t r = 0; r < reps[g].size(); ++r) {
        if (reps[g][r].ready) continue;
        const absl::Duration left = startup_deadline - absl::Now();
        absl::Status s = check(g, r, std::clamp(left, absl::Milliseconds(100), absl::Seconds(2)));
        if (s.code() == absl::StatusCode::kFailedPrecondition) return s;
        reps[g][r].ready = s.ok();
        if (!s.ok() && !first_round && absl::Now() >= startup_deadline) {
          std::fprintf(stderr, "router: %s\n", std::string(s.message()).c_str());
        }
      }
      if (!holds[g].has_value()) all_groups = false;
    }
    if (all_groups) break;
    if (absl::Now() >= startup_deadline) {
      return absl::UnavailableError(absl::StrCat(
          "after ", o.startup_timeout, " s some expert group has no replica that answers"));
    }
    absl::SleepFor(absl::Milliseconds(200));
  }
  std::vector<MoeDispatcher::GroupEntry> entries;
  std::vector<std::shared_ptr<ReplicaSet>> sets;
  for (size_t g = 0; g < o.groups.size(); ++g) {
    std::vector<std::shared_ptr<GrpcExpertGroup>> clients;
    for (const Replica& r : reps[g]) clients.push_back(r.client);
    ReplicaSetOptions ro;
    ro.attempt_timeout = absl::Seconds(o.attempt_timeout);
    ro.group_index = static_cast<int>(g);
    auto set = std::make_shared<ReplicaSet>(std::move(clients), ro, &metrics);
    for (size_t r = 0; r < reps[g].size(); ++r) {
      set->SetReady(r, reps[g][r].ready);
      if (!reps[g][r].ready) {
        std::fprintf(stderr, "router: group %zu replica %s is not answering; serving degraded\n", g,
                     o.groups[g][r].c_str());
      }
    }
    sets.push_back(set);
    entries.push_back({set, *holds[g]});
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
  // Replicas that were down at start join once they answer Describe with their group's
  // experts; health service "moemesh.router.all_replicas_ready" is NOT_SERVING while any
  // replica is out (the router itself, service "", serves throughout).
  auto report_degraded = [&] {
    bool degraded = false;
    for (size_t g = 0; g < sets.size(); ++g) {
      const int ready = sets[g]->ready_count(), total = static_cast<int>(sets[g]->size());
      metrics.SetGroupReplicas(static_cast<int>(g), ready, total);
      degraded |= ready < total;
    }
    host->SetServiceServing("moemesh.router.all_replicas_ready", !degraded);
    return degraded;
  };
  report_degraded();  // before the first probe, so health says it from the start
  std::atomic<bool> stop{false};
  std::thread prober([&] {
    while (!stop.load() && report_degraded()) {
      for (size_t g = 0; g < sets.size() && !stop.load(); ++g) {
        for (size_t r = 0; r < sets[g]->size(); ++r) {
          if (reps[g][r].ready) continue;
          absl::Status s = check(g, r, absl::Seconds(1));
          if (s.ok()) {
            reps[g][r].ready = true;
            sets[g]->SetReady(r, true);
            report_degraded();
            std::fprintf(stderr, "router: group %zu replica %s joined\n", g,
                         o.groups[g][r].c_str());
          } else if (s.code() == absl::StatusCode::kFailedPrecondition) {
            std::fprintf(stderr, "router: %s\n", std::string(s.message()).c_str());
          }
        }
      }
      absl::SleepFor(absl::Seconds(o.probe_interval));
    }
  });
  const int sig = WaitForShutdownSignal();
  std::fprintf(stderr, "router: signal %d, draining\n", sig);
  stop.store(true);
  prober.join();
  host->Drain(absl::Seconds(o.drain_seconds), absl::Seconds(o.not_serving_grace));
  return absl::OkStatus();
}

}  // namespace
}  // namespace moemesh::router

int main(int argc, char** argv) {
  return moemesh::ServiceMain("moemesh-router", argc, argv, moemesh::router::GetOptions,
                              moemesh::router::Run);
}
