// Mesh: starts a whole moemesh mesh as separate processes on loopback.
//
// Expert workers (groups × replicas) start first, then the router (told every worker's
// address), then the gateway. Ports are chosen by the services themselves (port 0) and read
// back from port files. Start returns once every process reports SERVING on grpc.health.v1.
// Stop sends SIGTERM (gateway, router, then workers, so in-flight calls drain) and SIGKILLs
// whatever is left after the grace period. Used by `moemesh up` and the integration tests.
//
// Children get PR_SET_PDEATHSIG, so they die with the launching process. Not thread-safe:
// call Start, Signal, Restart, Pid, Reap and Stop from one thread. PR_SET_PDEATHSIG follows
// the *thread* that forked, so Restart must be called from a thread that outlives the
// restarted process (the test's main thread), not from a short-lived helper thread.
#pragma once

#include <sys/types.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "services/net/delay_proxy.h"
#include "services/rpc/tls.h"

namespace moemesh {

struct MeshOptions {
  std::string bin_dir;   // directory holding moemesh-gateway, -router, -expert-worker
  std::string model;     // checkpoint directory
  std::string work_dir;  // port files and logs go here (created if missing)
  int groups = 1;
  int replicas = 1;
  int top_k = 0;
  // The services default to bf16 on the wire; the launcher defaults to f32 because the mesh
  // tests check the exactness contract (logits within 1e-4 of the engine) against it.
  std::string wire_dtype = "f32";
  bool metrics = false;  // give every service a /metrics port
  // DeepSeek shared experts in the gateway (the default, docs/SHARED-EXPERTS.md) or in
  // expert group 0, which every token then visits.
  bool shared_experts_in_gateway = true;
  // Name single-replica groups to the router as dns:///localhost:PORT (gRPC's DNS resolver
  // and round_robin, as with a headless Kubernetes Service) instead of host:port.
  bool dns_targets = false;
  // Name each group to the router as one multi-address target, ipv4:HOST:P1,HOST:P2 (gRPC
  // balances it round-robin, like a DNS name with several A records); groups are then
  // separated by ';'. Needs host:port worker addresses (not dns_targets).
  bool multi_address_groups = false;
  absl::Duration startup_timeout = absl::Seconds(120);
  // mTLS everywhere when set: every service gets --tls_cert/--tls_key/--tls_ca, and this process
  // (which health-checks them) becomes their TLS client (SetClientTls).
  TlsFiles tls;
  // Extra flags per service.
  std::vector<std::string> worker_args, router_args, gateway_args;
  // Overrides the default even split: experts spec per group ("0-3"), one per group.
  std::vector<std::string> group_experts;

  // The testbed that behaves like separate machines (docs/SCALE-OUT.md).
  // Micro-batches per gateway step (--micro_batches on the gateway): 2 overlaps one half's
  // attention with the other half's MoE call.
  int micro_batches = 1;
  // One-way latency added on every hop inside the mesh (gateway → router and router → each
  // worker) by a DelayProxy (services/net/delay_proxy.h) run in this process, its threads at
  // real-time priority when permitted (like a NIC, they do not wait for busy CPUs). Zero: none.
  absl::Duration added_latency = absl::ZeroDuration();
  // CPU lists ("0", "1", "2-3"); empty: unpinned. The gateway and router share
  // `gateway_cpus`, the workers `worker_cpus` (sched_setaffinity in the child before exec).
  std::string gateway_cpus, worker_cpus;
  // --kernel_threads for the gateway and workers. 0: the gateway takes one per CPU it may run
  // on; unpinned workers twice their share of this host's CPUs (2 × CPUs / groups, at least one,
  // at most every CPU); pinned workers one per CPU of `worker_cpus`.
  int kernel_threads = 0;
};

class Mesh {
 public:
  struct Process {
    std::string name;  // "gateway", "router", "worker-g0-r1"
    pid_t pid = -1;
    std::string address;  // host:port once serving
    std::string log;      // stdout+stderr file
    int group = -1, replica = -1;
    bool running = false;
    int starts = 1;  // 1 + the number of Restart calls
    // How it was started, so that Restart can start it again (without --port/--port_file).
    std::string binary;
    std::vector<std::string> args;
    std::string cpus;  // CPU list it is pinned to ("" = not pinned)
  };

  [[nodiscard]] static absl::StatusOr<std::unique_ptr<Mesh>> Start(const MeshOptions& options);
  ~Mesh();

  const std::string& gateway_address() const { return gateway_.address; }
  const std::string& router_address() const { return router_.address; }
  const std::vector<Process>& workers() const { return workers_; }
  const Process& gateway() const { return gateway_; }
  const Process& router() const { return router_; }

  // Sends `sig` to one process by name (SIGKILL simulates a crash).
  [[nodiscard]] absl::Status Signal(const std::string& name, int sig);
  // The pid of the named process as last started (-1 if there is no such process). After a
  // Restart this is the new process.
  pid_t Pid(const std::string& name) const;
  // Starts a process that has exited (or was SIGKILLed) again with the same binary and flags,
  // on the same port (`--port`), so that peers holding its address reconnect to the new one;
  // returns once it answers SERVING. Waits up to `timeout` for the old process to exit (it is
  // reaped here), then as long for the new one. Its log is appended to, not truncated.
  [[nodiscard]] absl::Status Restart(const std::string& name,
                                     absl::Duration timeout = absl::Seconds(60));
  // Names of processes that have exited, reaping them (non-blocking).
  std::vector<std::string> Reap();
  // Orderly shutdown; returns an error if something needed SIGKILL or exited non-zero.
  absl::Status Stop(absl::Duration grace = absl::Seconds(15));

 private:
  Mesh() = default;
  absl::StatusOr<Process> Spawn(const std::string& name, const std::string& binary,
                                std::vector<std::string> args, const std::string& cpus = "",
                                bool truncate_log = true);
  // `address` itself, or a DelayProxy in front of it when options_.added_latency is set.
  absl::StatusOr<std::string> Hop(const std::string& address);
  absl::Status WaitServing(Process* p, absl::Time deadline);
  std::vector<Process*> All();
  std::vector<const Process*> All() const;

  MeshOptions options_;
  std::vector<Process> workers_;
  Process router_, gateway_;
  bool stopped_ = false;
  std::vector<std::unique_ptr<DelayProxy>> proxies_;
};

// Asks grpc.health.v1 at `address` until it answers SERVING or `deadline` passes.
[[nodiscard]] absl::Status WaitForServing(const std::string& address, absl::Time deadline);

}  // namespace moemesh
