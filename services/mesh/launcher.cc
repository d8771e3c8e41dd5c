#include "services/mesh/launcher.h"

#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <optional>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "services/common/status_macros.h"
#include "services/compute/cpu/kernel_threads.h"
#include "services/model/config.h"
#include "services/moe/local_expert_group.h"
#include "services/rpc/tls.h"

namespace moemesh {

absl::Status WaitForServing(const std::string& address, absl::Time deadline) {
  auto channel = grpc::CreateChannel(address, ClientChannelCredentials());
  auto stub = grpc::health::v1::Health::NewStub(channel);
  std::string last = "no answer";
  while (absl::Now() < deadline) {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(std::min(deadline, absl::Now() + absl::Seconds(2))));
    grpc::health::v1::HealthCheckRequest req;
    grpc::health::v1::HealthCheckResponse resp;
    grpc::Status s = stub->Check(&ctx, req, &resp);
    if (s.ok() && resp.status() == grpc::health::v1::HealthCheckResponse::SERVING)
      return absl::OkStatus();
    last = s.ok() ? "NOT_SERVING" : s.error_message();
    absl::SleepFor(absl::Milliseconds(50));
  }
  return absl::DeadlineExceededError(absl::StrCat(address, " did not report SERVING: ", last));
}

namespace {

// "0", "1,3", "0-2" → a CPU set; INVALID_ARGUMENT on bad syntax.
absl::StatusOr<cpu_set_t> ParseCpuList(const std::string& list) {
  cpu_set_t set;
  CPU_ZERO(&set);
  auto ids = ParseIdRanges(list);
  if (!ids.ok()) return ids.status();
  for (int id : *ids) {
    if (id >= CPU_SETSIZE) return absl::InvalidArgumentError(absl::StrCat("no CPU ", id));
    CPU_SET(id, &set);
  }
  return set;
}

}  // namespace

absl::StatusOr<std::string> Mesh::Hop(const std::string& address) {
  if (options_.added_latency <= absl::ZeroDuration()) return address;
  ASSIGN_OR_RETURN(
      std::unique_ptr<DelayProxy> proxy,
      DelayProxy::Start(
          {.target = address, .one_way_delay = options_.added_latency, .realtime = true}));
  const std::string via = proxy->address();
  proxies_.push_back(std::move(proxy));
  return via;
}

absl::StatusOr<Mesh::Process> Mesh::Spawn(const std::string& name, const std::string& binary,
                                          std::vector<std::string> args, const std::string& cpus,
                                          bool truncate_log) {
  std::optional<cpu_set_t> affinity;
  if (!cpus.empty()) {
    ASSIGN_OR_RETURN(affinity, ParseCpuList(cpus));
  }
  Process p;
  p.name = name;
  p.binary = binary;
  p.args = args;
  p.cpus = cpus;
  p.log = absl::StrCat(options_.work_dir, "/", name, ".log");
  const std::string port_file = absl::StrCat(options_.work_dir, "/", name, ".port");
  ::unlink(port_file.c_str());
  args.push_back("--port_file=" + port_file);
  if (const TlsFiles& tls = options_.tls; !tls.cert.empty()) {
    args.push_back("--tls_cert=" + tls.cert);
    args.push_back("--tls_key=" + tls.key);
    if (!tls.ca.empty()) args.push_back("--tls_ca=" + tls.ca);
  }
  std::vector<std::string> argv_s = {binary};
  argv_s.insert(argv_s.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& a : argv_s) argv.push_back(a.data());
  argv.push_back(nullptr);
  const int log_fd = ::open(
      p.log.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC | (truncate_log ? O_TRUNC : O_APPEND), 0644);
  if (log_fd < 0) return absl::InternalError(absl::StrCat("cannot create ", p.log));
  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  if (pid < 0) {
    ::close(log_fd);
    return absl::InternalError(absl::StrCat("fork failed: ", std::strerror(errno)));
  }
  if (pid == 0) {
    // Child: only async-signal-safe calls until exec.
    ::prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (::getppid() != parent) ::_exit(1);
    sigset_t none;
    sigemptyset(&none);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    ::dup2(log_fd, 1);
    ::dup2(log_fd, 2);
    if (affinity && ::sched_setaffinity(0, sizeof(cpu_set_t), &*affinity) != 0) ::_exit(126);
    ::execv(argv[0], argv.data());
    ::_exit(127);
  }
  ::close(log_fd);
  p.pid = pid;
  p.running = true;
  return p;
}

absl::Status Mesh::WaitServing(Process* p, absl::Time deadline) {
  const std::string port_file = absl::StrCat(options_.work_dir, "/", p->name, ".port");
  while (true) {
    std::ifstream in(port_file);
    int port = 0;
    if (in >> port && port > 0) {
      p->address = absl::StrCat("127.0.0.1:", port);
      break;
    }
    int status = 0;
    if (::waitpid(p->pid, &status, WNOHANG) == p->pid) {
      p->running = false;
      std::ifstream log(p->log);
      std::string text((std::istreambuf_iterator<char>(log)), std::istreambuf_iterator<char>());
      if (text.size() > 2000) text = text.substr(text.size() - 2000);
      return absl::UnavailableError(absl::StrCat(p->name, " exited during start-up: ", text));
    }
    if (absl::Now() > deadline) {
      return absl::DeadlineExceededError(
          absl::StrCat(p->name, " did not start in time (log: ", p->log, ")"));
    }
    absl::SleepFor(absl::Milliseconds(20));
  }
  return WaitForServing(p->address, deadline);
}

absl::StatusOr<std::unique_ptr<Mesh>> Mesh::Start(const MeshOptions& o) {
  std::unique_ptr<Mesh> m(new Mesh());
  m->options_ = o;
  if (o.groups < 1 || o.replicas < 1)
    return absl::InvalidArgumentError("groups and replicas must be >= 1");
  if (!o.tls.cert.empty()) {
    ASSIGN_OR_RETURN(std::optional<TlsConfig> tls, LoadTls(o.tls));
    SetClientTls(std::move(tls));
  }
  ASSIGN_OR_RETURN(ModelConfig cfg, LoadModelConfig(o.model));
  if (o.groups > cfg.num_experts) {
    return absl::InvalidArgumentError(absl::StrCat("--groups ", o.groups, " exceeds the ",
                                                   cfg.num_experts, " experts per layer"));
  }
  if (!o.group_experts.empty() && static_cast<int>(o.group_experts.size()) != o.groups) {
    return absl::InvalidArgumentError("group_experts needs one spec per group");
  }
  ::mkdir(o.work_dir.c_str(), 0755);
  const absl::Time deadline = absl::Now() + o.startup_timeout;
  const std::string metrics_flag = o.metrics ? "--metrics_port=0" : "--metrics_port=-1";
  const std::string shared_flag =
      absl::StrCat("--shared_experts=", o.shared_experts_in_gateway ? "gateway" : "mesh");
  // Unpinned workers on this one host compute at the same time when a step's rows spread over
  // the groups, and one at a time when they go mostly to one group (a hot expert, streams
  // decoding alike). Each takes twice its share of the CPUs, at most all of them: a worker held
  // to its share (CPUs / groups, session 5) left the others' cores idle in the second case.
  // bench_mesh, 2 groups on 2 CPUs (both threads each, against one each), two interleaved runs
  // each (docs/BENCHMARKS.md, session 7): 16 streams with the same prompt 120.6 / 96.9 against
  // 93.4 / 87.8 tok/s, one stream 16.2 / 16.5 against 14.4 / 12.8, 16 distinct streams 72.3 /
  // 68.5 against 75.3 / 69.9. More groups than 2 were not measured; the factor of 2 bounds the
  // oversubscription when every group computes at once.
  int worker_threads = o.kernel_threads;
  if (worker_threads == 0 && o.worker_cpus.empty()) {
    const int cpus = cpu::DefaultKernelThreads();
    worker_threads = std::min(cpus, std::max(1, 2 * cpus / o.groups));
  }
  for (int g = 0; g < o.groups; ++g) {
    std::string spec;
    if (!o.group_experts.empty()) {
      spec = o.group_experts[g];
    } else {
      const int lo = cfg.num_experts * g / o.groups, hi = cfg.num_experts * (g + 1) / o.groups - 1;
      spec = absl::StrCat(lo, "-", hi);
      if (g == 0 && cfg.n_shared_experts > 0 && !o.shared_experts_in_gateway)
        absl::StrAppend(&spec, ",shared");
    }
    for (int r = 0; r < o.replicas; ++r) {
      const std::string name = absl::StrCat("worker-g", g, "-r", r);
      std::vector<std::string> args = {"--model=" + o.model, "--experts=" + spec, "--name=" + name,
                                       absl::StrCat("--top_k=", o.top_k), metrics_flag};
      if (worker_threads > 0) args.push_back(absl::StrCat("--kernel_threads=", worker_threads));
      args.insert(args.end(), o.worker_args.begin(), o.worker_args.end());
      ASSIGN_OR_RETURN(Process p,
                       m->Spawn(name, o.bin_dir + "/moemesh-expert-worker", args, o.worker_cpus));
      p.group = g;
      p.replica = r;
      m->workers_.push_back(std::move(p));
    }
  }
  for (Process& p : m->workers_) RETURN_IF_ERROR(m->WaitServing(&p, deadline));
  std::vector<std::string> groups;
  for (int g = 0; g < o.groups; ++g) {
    std::vector<std::string> reps;
    for (const Process& p : m->workers_) {
      if (p.group != g) continue;
      ASSIGN_OR_RETURN(const std::string hop, m->Hop(p.address));
      reps.push_back(
          o.dns_targets ? absl::StrCat("dns:///localhost:", hop.substr(hop.rfind(':') + 1)) : hop);
    }
    groups.push_back(o.multi_address_groups ? absl::StrCat("ipv4:", absl::StrJoin(reps, ","))
                                            : absl::StrJoin(reps, "|"));
  }
  std::vector<std::string> rargs = {
      "--model=" + o.model,
      "--groups=" + absl::StrJoin(groups, o.multi_address_groups ? ";" : ","),
      "--wire_dtype=" + o.wire_dtype,
      absl::StrCat("--top_k=", o.top_k),
      metrics_flag,
      shared_flag};
  rargs.insert(rargs.end(), o.router_args.begin(), o.router_args.end());
  ASSIGN_OR_RETURN(m->router_,
                   m->Spawn("router", o.bin_dir + "/moemesh-router", rargs, o.gateway_cpus));
  RETURN_IF_ERROR(m->WaitServing(&m->router_, deadline));
  ASSIGN_OR_RETURN(const std::string router_hop, m->Hop(m->router_.address));
  std::vector<std::string> gargs = {"--model=" + o.model,
                                    "--router=" + router_hop,
                                    "--wire_dtype=" + o.wire_dtype,
                                    absl::StrCat("--top_k=", o.top_k),
                                    metrics_flag,
                                    shared_flag};
  if (o.micro_batches != 1) gargs.push_back(absl::StrCat("--micro_batches=", o.micro_batches));
  if (o.kernel_threads > 0) gargs.push_back(absl::StrCat("--kernel_threads=", o.kernel_threads));
  gargs.insert(gargs.end(), o.gateway_args.begin(), o.gateway_args.end());
  ASSIGN_OR_RETURN(m->gateway_,
                   m->Spawn("gateway", o.bin_dir + "/moemesh-gateway", gargs, o.gateway_cpus));
  RETURN_IF_ERROR(m->WaitServing(&m->gateway_, deadline));
  return m;
}

Mesh::~Mesh() {
  if (!stopped_) Stop(absl::Seconds(5)).IgnoreError();
}

std::vector<Mesh::Process*> Mesh::All() {
  std::vector<Process*> all = {&gateway_, &router_};
  for (Process& p : workers_) all.push_back(&p);
  return all;
}

std::vector<const Mesh::Process*> Mesh::All() const {
  std::vector<const Process*> all = {&gateway_, &router_};
  for (const Process& p : workers_) all.push_back(&p);
  return all;
}

pid_t Mesh::Pid(const std::string& name) const {
  for (const Process* p : All())
    if (p->name == name) return p->pid;
  return -1;
}

absl::Status Mesh::Restart(const std::string& name, absl::Duration timeout) {
  Process* p = nullptr;
  for (Process* q : All())
    if (q->name == name) p = q;
  if (p == nullptr) return absl::NotFoundError(absl::StrCat("no process named ", name));
  if (p->address.empty())
    return absl::FailedPreconditionError(absl::StrCat(name, " never served: no port to reuse"));
  // The old process must be gone (and reaped) before its port can be bound again.
  const absl::Time exit_deadline = absl::Now() + timeout;
  while (p->running) {
    int status = 0;
    const pid_t r = ::waitpid(p->pid, &status, WNOHANG);
    if (r == p->pid || r < 0) {
      p->running = false;
      break;
    }
    if (absl::Now() > exit_deadline)
      return absl::FailedPreconditionError(
          absl::StrCat(name, " (pid ", p->pid, ") is still running"));
    absl::SleepFor(absl::Milliseconds(10));
  }
  const std::string port = p->address.substr(p->address.rfind(':') + 1);
  std::vector<std::string> args = p->args;
  args.push_back("--port=" + port);
  ASSIGN_OR_RETURN(Process fresh, Spawn(name, p->binary, args, p->cpus, /*truncate_log=*/false));
  fresh.args = p->args;  // without --port, as first started
  fresh.group = p->group;
  fresh.replica = p->replica;
  fresh.starts = p->starts + 1;
  *p = std::move(fresh);
  return WaitServing(p, absl::Now() + timeout);
}

absl::Status Mesh::Signal(const std::string& name, int sig) {
  for (Process* p : All()) {
    if (p->name == name && p->pid > 0) {
      if (!p->running) return absl::FailedPreconditionError(absl::StrCat(name, " is not running"));
      if (::kill(p->pid, sig) != 0)
        return absl::InternalError(absl::StrCat("kill ", name, ": ", std::strerror(errno)));
      return absl::OkStatus();
    }
  }
  return absl::NotFoundError(absl::StrCat("no process named ", name));
}

std::vector<std::string> Mesh::Reap() {
  std::vector<std::string> exited;
  for (Process* p : All()) {
    if (!p->running || p->pid <= 0) continue;
    int status = 0;
    if (::waitpid(p->pid, &status, WNOHANG) == p->pid) {
      p->running = false;
      exited.push_back(p->name);
    }
  }
  return exited;
}

absl::Status Mesh::Stop(absl::Duration grace) {
  stopped_ = true;
  std::vector<std::string> problems;
  // Front to back, so that each tier drains while the tiers it calls still serve.
  std::vector<std::vector<Process*>> tiers = {{&gateway_}, {&router_}, {}};
  for (Process& p : workers_) tiers[2].push_back(&p);
  for (auto& tier : tiers) {
    for (Process* p : tier)
      if (p->running && p->pid > 0) ::kill(p->pid, SIGTERM);
    const absl::Time deadline = absl::Now() + grace;
    for (Process* p : tier) {
      if (!p->running || p->pid <= 0) continue;
      int status = 0;
      while (true) {
        const pid_t r = ::waitpid(p->pid, &status, WNOHANG);
        if (r == p->pid) {
          if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
            problems.push_back(absl::StrCat(p->name, " exited with status ", status));
          }
          break;
        }
        if (r < 0) break;
        if (absl::Now() > deadline) {
          ::kill(p->pid, SIGKILL);
          ::waitpid(p->pid, &status, 0);
          problems.push_back(absl::StrCat(p->name, " needed SIGKILL"));
          break;
        }
        absl::SleepFor(absl::Milliseconds(10));
      }
      p->running = false;
    }
  }
  proxies_.clear();  // after every process: the tiers drained through them
  if (!problems.empty()) return absl::InternalError(absl::StrJoin(problems, "; "));
  return absl::OkStatus();
}

}  // namespace moemesh
