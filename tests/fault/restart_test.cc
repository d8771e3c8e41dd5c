// Issue 9 §3: startup and restarts.
//
// - A router started while one replica of a group is down serves degraded (Topology marks the
//   replica unhealthy, health service "moemesh.router.all_replicas_ready" is NOT_SERVING),
//   and picks the replica up when it comes, with no restart.
// - The gateway survives a router restart: the router is SIGKILLed and started again on the
//   same port; requests afterwards succeed with the same tokens, with no gateway restart.
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "services/rpc/server_host.h"
#include "services/rpc/tensor_proto.h"
#include "tests/mesh_util.h"
#include "tests/test_util.h"

namespace moemesh::testing {
namespace {

// A child process killed (SIGKILL) and reaped when this goes out of scope.
class Child {
 public:
  Child(const std::string& binary, std::vector<std::string> args, const std::string& log) {
    args.insert(args.begin(), binary);
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    pid_ = ::fork();
    if (pid_ == 0) {
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
      if (fd >= 0) {
        ::dup2(fd, 1);
        ::dup2(fd, 2);
      }
      ::execv(argv[0], argv.data());
      ::_exit(127);
    }
  }
  ~Child() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
  }
  bool alive() const { return pid_ > 0 && ::waitpid(pid_, nullptr, WNOHANG) == 0; }

 private:
  pid_t pid_ = -1;
};

// A port that was free a moment ago (the kernel's pick for port 0).
int FreePort() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a));
  socklen_t len = sizeof(a);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  ::close(fd);
  return ntohs(a.sin_port);
}

absl::StatusOr<v1::TopologyResponse> Topology(const std::string& router) {
  auto stub = RouterClient(router);
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(10)));
  ctx.set_wait_for_ready(true);
  v1::TopologyRequest req;
  v1::TopologyResponse resp;
  grpc::Status s = stub->Topology(&ctx, req, &resp);
  if (!s.ok()) return FromGrpcStatus(s);
  return resp;
}

// grpc.health.v1 status of `service` at `address` (SERVICE_UNKNOWN when not registered), or
// -1 when no answer came by `deadline`. Each call opens a new channel and waits for it to
// connect within the deadline: a first connection attempt that fails on a loaded machine would
// otherwise read as -1 at once.
int Health(const std::string& address, const std::string& service,
           absl::Time deadline = absl::Now() + absl::Seconds(30)) {
  auto stub = grpc::health::v1::Health::NewStub(MakeChannel(address));
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(deadline));
  ctx.set_wait_for_ready(true);
  grpc::health::v1::HealthCheckRequest req;
  req.set_service(service);
  grpc::health::v1::HealthCheckResponse resp;
  if (!stub->Check(&ctx, req, &resp).ok()) return -1;
  return resp.status();
}

GeneratorOptions SmallModel(uint64_t seed) {
  GeneratorOptions g;
  g.config = SmallMixtralConfig(256, 64, 128, 2, 4, 2, 4, 2);
  g.seed = seed;
  return g;
}

TEST(RestartTest, RouterStartsDegradedAndPicksUpAReplicaThatComesLater) {
  TempDir dir;
  const std::string model = MakeModel(dir, "model", SmallModel(11));
  MeshOptions o = TestMeshOptions(model, dir.Join("work"), 2, 1);
  auto mesh = Mesh::Start(o);
  ASSERT_TRUE(mesh.ok()) << mesh.status();
  const std::string bin = MOEMESH_BIN_DIR;
  // A second router whose group 1 has a second replica that is not up yet.
  const int late_port = FreePort();
  const int router_port = FreePort();
  const std::string groups = absl::StrCat((*mesh)->workers()[0].address, ",",
                                          (*mesh)->workers()[1].address, "|127.0.0.1:", late_port);
  Child router(bin + "/moemesh-router",
               {"--model=" + model, "--groups=" + groups, absl::StrCat("--port=", router_port),
                "--startup_timeout=20", "--probe_interval=0.2"},
               dir.Join("router2.log"));
  const std::string raddr = absl::StrCat("127.0.0.1:", router_port);
  ASSERT_TRUE(WaitForServing(raddr, absl::Now() + absl::Seconds(90)).ok())
      << ReadFileOrDie(dir.Join("router2.log"));
  auto topo = Topology(raddr);
  ASSERT_TRUE(topo.ok()) << topo.status();
  ASSERT_EQ(topo->groups(1).replicas_size(), 2);
  EXPECT_TRUE(topo->groups(1).replicas(0).healthy());
  EXPECT_FALSE(topo->groups(1).replicas(1).healthy());
  EXPECT_EQ(Health(raddr, "moemesh.router.all_replicas_ready"),
            grpc::health::v1::HealthCheckResponse::NOT_SERVING);
  // Degraded, it serves: a Forward through the router works.
  auto forward = [&] {
    auto stub = RouterClient(raddr);
    grpc::ClientContext ctx;
    WaitForReady(&ctx, absl::Seconds(30));  // a new channel each time
    v1::ForwardRequest req;
    req.set_layer(0);
    TensorToProto(Tensor::Zeros({3, 64}), DType::kF32, req.mutable_hidden());
    v1::ForwardResponse resp;
    return stub->Forward(&ctx, req, &resp);
  };
  EXPECT_TRUE(forward().ok());
  // The late replica comes up; the router adds it without a restart.
  Child late(bin + "/moemesh-expert-worker",
             {"--model=" + model, "--experts=2-3", absl::StrCat("--port=", late_port)},
             dir.Join("late.log"));
  ASSERT_TRUE(
      WaitForServing(absl::StrCat("127.0.0.1:", late_port), absl::Now() + absl::Seconds(90)).ok());
  bool joined = false;
  for (const absl::Time end = absl::Now() + absl::Seconds(60); !joined && absl::Now() < end;) {
    auto t = Topology(raddr);
    // Health follows Topology by a moment: wait for both.
    joined = t.ok() && t->groups(1).replicas(1).healthy() &&
             Health(raddr, "moemesh.router.all_replicas_ready") ==
                 grpc::health::v1::HealthCheckResponse::SERVING;
    if (!joined) absl::SleepFor(absl::Milliseconds(100));
  }
  EXPECT_TRUE(joined) << ReadFileOrDie(dir.Join("router2.log"));
  EXPECT_EQ(Health(raddr, "moemesh.router.all_replicas_ready"),
            grpc::health::v1::HealthCheckResponse::SERVING);
  EXPECT_TRUE(forward().ok());
  EXPECT_TRUE(router.alive());
  EXPECT_TRUE((*mesh)->Stop().ok());
}

TEST(RestartTest, GatewaySurvivesARouterRestart) {
  TempDir dir;
  const std::string model = MakeModel(dir, "model", SmallModel(12));
  MeshOptions o = TestMeshOptions(model, dir.Join("work"), 2, 1);
  auto mesh = Mesh::Start(o);
  ASSERT_TRUE(mesh.ok()) << mesh.status();
  const std::vector<std::vector<int32_t>> prompts = {{3, 1, 4, 1, 5}, {9, 2, 6}};
  const auto want = GenerateInproc(model, prompts, 12);
  auto gw = GatewayClient((*mesh)->gateway_address());
  auto before = GenerateViaGateway(gw.get(), prompts[0], 12);
  ASSERT_TRUE(before.ok()) << before.status();
  EXPECT_EQ(*before, want[0]);

  const std::string raddr = (*mesh)->router_address();
  const std::string port = raddr.substr(raddr.rfind(':') + 1);
  ASSERT_TRUE((*mesh)->Signal("router", SIGKILL).ok());
  absl::SleepFor(absl::Milliseconds(300));
  // While the router is down a request waits (wait-for-ready, retries) rather than failing;
  // the router comes back on the same port within that time.
  absl::StatusOr<std::vector<int32_t>> during;
  std::thread t([&] { during = GenerateViaGateway(gw.get(), prompts[1], 12, absl::Seconds(90)); });
  absl::SleepFor(absl::Milliseconds(500));
  const std::string groups =
      absl::StrCat((*mesh)->workers()[0].address, ",", (*mesh)->workers()[1].address);
  Child router(std::string(MOEMESH_BIN_DIR) + "/moemesh-router",
               {"--model=" + model, "--groups=" + groups, "--port=" + port},
               dir.Join("router2.log"));
  t.join();
  ASSERT_TRUE(during.ok()) << during.status() << "\n" << ReadFileOrDie(dir.Join("router2.log"));
  EXPECT_EQ(*during, want[1]);
  auto after = GenerateViaGateway(gw.get(), prompts[0], 12);
  ASSERT_TRUE(after.ok()) << after.status();
  EXPECT_EQ(*after, want[0]);
  (*mesh)->Stop().IgnoreError();  // the killed router is reported
}

TEST(RestartTest, SigtermTurnsHealthNotServingFirstAndServesThroughTheGrace) {
  TempDir dir;
  const std::string model = MakeModel(dir, "model", SmallModel(13));
  MeshOptions o = TestMeshOptions(model, dir.Join("work"), 1, 2);
  o.worker_args = {"--not_serving_grace=3", "--drain_seconds=1"};
  auto mesh = Mesh::Start(o);
  ASSERT_TRUE(mesh.ok()) << mesh.status();
  const std::string waddr = (*mesh)->workers()[0].address;
  auto worker = WorkerClient(waddr);
  auto run = [&] {
    // The first call opens the channel: it waits for the connection rather than failing at
    // once if a first attempt fails on a loaded machine.
    grpc::ClientContext ctx;
    WaitForReady(&ctx, absl::Seconds(10));
    v1::RunExpertsRequest req;
    TensorToProto(Tensor::Zeros({1, 64}), DType::kF32, req.mutable_tokens());
    req.add_offsets(0);
    req.add_offsets(1);
    req.add_experts(0);
    req.add_weights(1.0f);
    v1::RunExpertsResponse resp;
    return worker->RunExperts(&ctx, req, &resp);
  };
  ASSERT_TRUE(run().ok());
  const absl::Time term = absl::Now();
  ASSERT_TRUE((*mesh)->Signal("worker-g0-r0", SIGTERM).ok());
  // The worker turns NOT_SERVING as it handles the signal and stays up through its 3 s grace
  // and 1 s drain. On a loaded machine handling the signal and each health check can take
  // seconds, so the check allows 10 s.
  bool not_serving = false;
  const absl::Time give_up = term + absl::Seconds(10);
  while (!not_serving && absl::Now() < give_up) {
    not_serving = Health(waddr, "", give_up) == grpc::health::v1::HealthCheckResponse::NOT_SERVING;
    if (!not_serving) absl::SleepFor(absl::Milliseconds(20));
  }
  ASSERT_TRUE(not_serving) << "no NOT_SERVING within 10 s of SIGTERM";
  // Still inside the grace (3 s after the signal): calls are served.
  const grpc::Status during = run();
  if (absl::Now() < term + absl::Seconds(3)) {
    EXPECT_TRUE(during.ok()) << during.error_message();
  }
  // The mesh loses nothing: the router uses the other replica.
  auto gw = GatewayClient((*mesh)->gateway_address());
  const std::vector<std::vector<int32_t>> prompts = {{7, 8, 9}};
  const auto want = GenerateInproc(model, prompts, 8);
  auto got = GenerateViaGateway(gw.get(), prompts[0], 8);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(*got, want[0]);
  (*mesh)->Stop().IgnoreError();
}

}  // namespace
}  // namespace moemesh::testing
