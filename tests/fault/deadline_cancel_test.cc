// Deadlines, cancellation and graceful drain, with real processes on loopback.
//
// - A client deadline ends the request with DEADLINE_EXCEEDED, the gateway stops generating
//   for it (its completion count stays far below max_tokens), the deadline reaches the router
//   mid-step, and the mesh keeps serving the same tokens as the single-process engine.
// - A client that cancels its stream gets CANCELLED; concurrent streams are unaffected.
// - SIGTERM to the gateway drains: every in-flight stream completes with all its tokens, new
//   connections are refused (UNAVAILABLE) while it drains, and it exits 0.
// - SIGTERM to one replica of a replicated worker group loses no request (the router retries
//   the other replica) and the worker exits 0 (disabled for now; see the test).
#include <signal.h>
#include <sys/wait.h>

#include <algorithm>
#include <atomic>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "services/rpc/server_host.h"
#include "tests/mesh_util.h"
#include "tests/metrics_scrape.h"
#include "tests/test_util.h"

namespace moemesh::testing {
namespace {

constexpr int kVocab = 256;

struct Stream {
  std::vector<int32_t> tokens;
  grpc::Status status;
  bool finished = false;  // a message carried a finish reason
};

struct StreamOptions {
  int max_tokens = 16;
  absl::Duration timeout = absl::Seconds(120);
  int cancel_after = -1;                 // TryCancel once this many tokens arrived (-1: never)
  std::atomic<int>* progress = nullptr;  // bumped for every token received
};

// Streams a greedy generation from the gateway at `address` on a channel of its own. The
// channel connects before the call starts, so that all of `o.timeout` is spent on the request
// and none on a first connection (which a loaded machine can be slow to make, or refuse once).
Stream RunStream(const std::string& address, const std::vector<int32_t>& prompt,
                 const StreamOptions& o) {
  Stream s;
  auto channel = MakeChannel(address);
  if (!channel->WaitForConnected(absl::ToChronoTime(absl::Now() + absl::Seconds(60)))) {
    s.status = grpc::Status(grpc::StatusCode::UNAVAILABLE, "no connection to the gateway in 60 s");
    return s;
  }
  auto gw = v1::Gateway::NewStub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + o.timeout));
  ctx.set_wait_for_ready(true);
  v1::GenerateRequest req;
  req.mutable_prompt_tokens()->mutable_ids()->Add(prompt.begin(), prompt.end());
  req.set_max_tokens(o.max_tokens);
  req.set_ignore_eos(true);
  auto reader = gw->Generate(&ctx, req);
  v1::GenerateResponse resp;
  bool cancelled = false;
  while (reader->Read(&resp)) {
    s.tokens.insert(s.tokens.end(), resp.token_ids().begin(), resp.token_ids().end());
    if (o.progress != nullptr) o.progress->fetch_add(resp.token_ids_size());
    if (resp.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) s.finished = true;
    if (!cancelled && o.cancel_after >= 0 && static_cast<int>(s.tokens.size()) >= o.cancel_after) {
      ctx.TryCancel();
      cancelled = true;
    }
  }
  s.status = reader->Finish();
  return s;
}

std::vector<int32_t> Prompt(int n, int salt) {
  std::vector<int32_t> p;
  for (int j = 0; j < n; ++j) p.push_back((j * 29 + salt * 7 + 1) % kVocab);
  return p;
}

// ModelInfo on a brand-new connection (a channel with its own subchannel pool, so no
// connection opened earlier is reused); returns the status code.
grpc::StatusCode ProbeNewConnection(const std::string& address) {
  grpc::ChannelArguments args = DefaultChannelArguments();
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  auto channel = grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args);
  auto stub = v1::Gateway::NewStub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(2)));
  v1::ModelInfoRequest req;
  v1::ModelInfoResponse resp;
  return stub->ModelInfo(&ctx, req, &resp).error_code();
}

// ProbeNewConnection until one answers OK, for up to `patience`: a server that accepts new
// connections can still have one attempt refused on a loaded machine. Returns the last code.
grpc::StatusCode ProbeNewConnectionUntilOk(const std::string& address,
                                           absl::Duration patience = absl::Seconds(10)) {
  const absl::Time give_up = absl::Now() + patience;
  grpc::StatusCode code = ProbeNewConnection(address);
  while (code != grpc::StatusCode::OK && absl::Now() < give_up) {
    absl::SleepFor(absl::Milliseconds(100));
    code = ProbeNewConnection(address);
  }
  return code;
}

// Waits (bounded) for `pid`, a child of this process, to exit WITHOUT reaping it, so that
// Mesh::Reap still sees it. Returns the wait status as waitpid would, or -1 on timeout.
int WaitExitNoReap(pid_t pid, absl::Duration timeout) {
  const absl::Time give_up = absl::Now() + timeout;
  while (absl::Now() < give_up) {
    siginfo_t info = {};
    if (::waitid(P_PID, pid, &info, WEXITED | WNOHANG | WNOWAIT) == 0 && info.si_pid == pid) {
      if (info.si_code == CLD_EXITED) return (info.si_status & 0xff) << 8;
      return info.si_status & 0x7f;  // killed by a signal
    }
    absl::SleepFor(absl::Milliseconds(20));
  }
  return -1;
}

std::string Tail(const std::string& path) {
  std::string text = ReadFileOrDie(path);
  return text.size() > 3000 ? text.substr(text.size() - 3000) : text;
}

class DeadlineCancelTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir();
    GeneratorOptions g;
    // Four MoE layers: every generated token costs four router round trips, so long
    // generations stay in flight while the test acts on them.
    g.config = SmallMixtralConfig(kVocab, 128, 256, 4, 4, 2, 8, 2);
    g.seed = 5;
    model_ = new std::string(MakeModel(*dir_, "model", g));
  }
  static void TearDownTestSuite() {
    delete model_;
    delete dir_;
  }

  static TempDir* dir_;
  static std::string* model_;
};
TempDir* DeadlineCancelTest::dir_ = nullptr;
std::string* DeadlineCancelTest::model_ = nullptr;

TEST_F(DeadlineCancelTest, ShortDeadlineEndsTheRequestAndTheMeshKeepsServing) {
  MeshOptions o = TestMeshOptions(*model_, dir_->Join("work-deadline"), 2);
  o.metrics = true;
  auto mesh = Mesh::Start(o);
  ASSERT_TRUE(mesh.ok()) << mesh.status();
  const std::string gw_address = (*mesh)->gateway_address();
  auto metrics = MetricsAddressFromLog((*mesh)->gateway().log);
  ASSERT_TRUE(metrics.ok()) << metrics.status();

  // 2000 tokens need 8000 router round trips (and twice as many worker calls): far more
  // than 200 ms on any machine. RunStream connects before the call starts, so the 200 ms run
  // from a connected channel: the request always reaches the gateway (which then counts its
  // prompt when it drops it), even where a first connection takes longer than that.
  const int kLong = 2000;
  StreamOptions so;
  so.max_tokens = kLong;
  so.timeout = absl::Milliseconds(200);
  const std::vector<int32_t> long_prompt = Prompt(9, 1);
  const Stream expired = RunStream(gw_address, long_prompt, so);
  EXPECT_EQ(expired.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED)
      << expired.status.error_message();
  EXPECT_FALSE(expired.finished);

  // The gateway drops the request: it leaves the batch (the gateway then counts its prompt and
  // completion tokens) with far fewer than max_tokens generated.
  const double prompt_len = static_cast<double>(long_prompt.size());
  double prompt_count = 0, completion = 0;
  for (int i = 0; i < 200 && prompt_count < prompt_len; ++i) {
    auto text = ScrapeMetrics(*metrics);
    ASSERT_TRUE(text.ok()) << text.status();
    prompt_count = SumSamples(*text, "moemesh_tokens_total", {{"kind", "prompt"}});
    completion = SumSamples(*text, "moemesh_tokens_total", {{"kind", "completion"}});
    if (prompt_count < prompt_len) absl::SleepFor(absl::Milliseconds(50));
  }
  EXPECT_EQ(prompt_count, prompt_len) << "the expired request never left the batch";
  EXPECT_LT(completion, kLong / 2) << "the gateway kept generating after the deadline";

  // Still serving, with the single-process engine's tokens.
  const std::vector<int32_t> prompt = Prompt(12, 2);
  auto gw = GatewayClient(gw_address);
  auto got = GenerateViaGateway(gw.get(), prompt, 10);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(*got, GenerateInproc(*model_, {prompt}, 10)[0]);
  EXPECT_TRUE((*mesh)->Stop().ok());
}

TEST(DeadlinePropagationTest, ScoreDeadlineReachesTheRouterMidStep) {
  TempDir dir;
  GeneratorOptions g;
  // Heavy experts, light attention: nearly all of a prefill step is spent inside router
  // calls, so a deadline at half the step's duration expires while one is in flight.
  g.config = SmallMixtralConfig(kVocab, 256, 4096, 2, 4, 2, 8, 2);
  g.seed = 9;
  const std::string model = MakeModel(dir, "model", g);
  MeshOptions o = TestMeshOptions(model, dir.Join("work"), 2);
  o.metrics = true;
  auto mesh = Mesh::Start(o);
  ASSERT_TRUE(mesh.ok()) << mesh.status();
  auto router_metrics = MetricsAddressFromLog((*mesh)->router().log);
  ASSERT_TRUE(router_metrics.ok()) << router_metrics.status();
  auto gw = GatewayClient((*mesh)->gateway_address());
  const std::vector<int32_t> prompt = Prompt(512, 3);

  auto router_failures = [&]() -> absl::StatusOr<double> {
    auto text = ScrapeMetrics(*router_metrics);
    if (!text.ok()) return text.status();
    return SumSamples(*text, "moemesh_requests_total", {{"method", "Forward"}}) -
           SumSamples(*text, "moemesh_requests_total", {{"method", "Forward"}, {"code", "OK"}});
  };

  // How long a warm Score takes here (not asserted; it only places the deadlines). The fastest
  // of three: one slowed by a burst of load elsewhere would place every deadline late, past
  // the end of the step.
  auto full = ScoreViaGateway(gw.get(), prompt);
  ASSERT_TRUE(full.ok()) << full.status();
  absl::Duration took = absl::InfiniteDuration();
  for (int i = 0; i < 3; ++i) {
    const absl::Time t0 = absl::Now();
    ASSERT_TRUE(ScoreViaGateway(gw.get(), prompt).ok());
    took = std::min(took, absl::Now() - t0);
  }

  // Most of a step is inside router calls, so a deadline placed inside the step usually cuts
  // one short; a few placements make a miss (the deadline falling in the gateway's own
  // attention between two calls) vanishingly unlikely.
  double failed = 0;
  int expired = 0;
  for (double fraction : {0.5, 0.3, 0.6, 0.4, 0.5, 0.35}) {
    auto cut = ScoreViaGateway(gw.get(), prompt, took * fraction);
    if (cut.status().code() != absl::StatusCode::kDeadlineExceeded) continue;
    ++expired;
    // The router finishes the cut-short Forward (with CANCELLED or DEADLINE_EXCEEDED) soon
    // after the client gave up.
    for (int i = 0; i < 40 && failed == 0; ++i) {
      auto f = router_failures();
      ASSERT_TRUE(f.ok()) << f.status();
      failed = *f;
      if (failed == 0) absl::SleepFor(absl::Milliseconds(25));
    }
    if (failed > 0) break;
  }
  EXPECT_GE(expired, 1) << "no Score ended with DEADLINE_EXCEEDED";
  EXPECT_GE(failed, 1) << "no router call was cut short by the client's deadline (a Score takes "
                       << absl::FormatDuration(took) << ")";

  // And the next request is complete and exact.
  auto again = ScoreViaGateway(gw.get(), prompt);
  ASSERT_TRUE(again.ok()) << again.status();
  ASSERT_EQ(again->shape(), full->shape());
  EXPECT_LE(MaxAbsDiff(again->data(), full->data(), full->numel()), 1e-5);
  EXPECT_TRUE((*mesh)->Stop().ok());
}

TEST_F(DeadlineCancelTest, CancelledStreamLeavesOthersUnaffected) {
  MeshOptions o = TestMeshOptions(*model_, dir_->Join("work-cancel"), 2);
  o.metrics = true;
  auto mesh = Mesh::Start(o);
  ASSERT_TRUE(mesh.ok()) << mesh.status();
  const std::string gw_address = (*mesh)->gateway_address();
  auto metrics = MetricsAddressFromLog((*mesh)->gateway().log);
  ASSERT_TRUE(metrics.ok()) << metrics.status();

  const int kOthers = 5, kMax = 40, kLong = 1000, kCancelAfter = 3;
  std::vector<std::vector<int32_t>> prompts;
  for (int i = 0; i < kOthers; ++i) prompts.push_back(Prompt(2 + 3 * i, 10 + i));
  const auto want = GenerateInproc(*model_, prompts, kMax);

  const std::vector<int32_t> cancelled_prompt = Prompt(7, 99);
  std::vector<Stream> got(kOthers);
  Stream cancelled;
  std::vector<std::thread> threads;
  for (int i = 0; i < kOthers; ++i) {
    threads.emplace_back([&, i] {
      StreamOptions so;
      so.max_tokens = kMax;
      got[i] = RunStream(gw_address, prompts[i], so);
    });
  }
  threads.emplace_back([&] {
    StreamOptions so;
    so.max_tokens = kLong;
    so.cancel_after = kCancelAfter;
    cancelled = RunStream(gw_address, cancelled_prompt, so);
  });
  for (auto& t : threads) t.join();

  EXPECT_EQ(cancelled.status.error_code(), grpc::StatusCode::CANCELLED)
      << cancelled.status.error_message();
  EXPECT_FALSE(cancelled.finished);
  EXPECT_GE(static_cast<int>(cancelled.tokens.size()), kCancelAfter);
  for (int i = 0; i < kOthers; ++i) {
    EXPECT_TRUE(got[i].status.ok()) << "stream " << i << ": " << got[i].status.error_message();
    EXPECT_TRUE(got[i].finished) << "stream " << i;
    EXPECT_EQ(got[i].tokens, want[i]) << "stream " << i;
  }

  // The gateway stopped generating for the cancelled stream: once it has left the batch (and
  // the gateway has counted every prompt), the completion count is the others' plus a few.
  const double others = kOthers * kMax;
  double prompt_count = 0, completion = 0;
  double all_prompts = static_cast<double>(cancelled_prompt.size());
  for (const auto& p : prompts) all_prompts += static_cast<double>(p.size());
  for (int i = 0; i < 200 && prompt_count < all_prompts; ++i) {
    auto text = ScrapeMetrics(*metrics);
    ASSERT_TRUE(text.ok()) << text.status();
    prompt_count = SumSamples(*text, "moemesh_tokens_total", {{"kind", "prompt"}});
    completion = SumSamples(*text, "moemesh_tokens_total", {{"kind", "completion"}});
    if (prompt_count < all_prompts) absl::SleepFor(absl::Milliseconds(50));
  }
  EXPECT_EQ(prompt_count, all_prompts) << "the cancelled request never left the batch";
  EXPECT_GE(completion, others + kCancelAfter);
  EXPECT_LT(completion, others + kLong / 2) << "the gateway kept generating after the cancel";

  // The mesh still serves.
  auto gw = GatewayClient(gw_address);
  auto again = GenerateViaGateway(gw.get(), prompts[0], 6);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(*again, std::vector<int32_t>(want[0].begin(), want[0].begin() + 6));
  EXPECT_TRUE((*mesh)->Stop().ok());
}

TEST_F(DeadlineCancelTest, GatewaySigtermDrainsInFlightStreamsAndRefusesNewConnections) {
  auto mesh = Mesh::Start(TestMeshOptions(*model_, dir_->Join("work-drain-gateway"), 2));
  ASSERT_TRUE(mesh.ok()) << mesh.status();
  const std::string gw_address = (*mesh)->gateway_address();
  ASSERT_EQ(ProbeNewConnectionUntilOk(gw_address), grpc::StatusCode::OK);

  const int kStreams = 6, kMax = 160;
  std::vector<std::vector<int32_t>> prompts;
  for (int i = 0; i < kStreams; ++i) prompts.push_back(Prompt(3 + 4 * i, 20 + i));
  const auto want = GenerateInproc(*model_, prompts, kMax);

  std::vector<std::atomic<int>> progress(kStreams);
  std::atomic<int> done{0};
  std::vector<Stream> got(kStreams);
  std::vector<std::thread> threads;
  for (int i = 0; i < kStreams; ++i) {
    threads.emplace_back([&, i] {
      StreamOptions so;
      so.max_tokens = kMax;
      so.progress = &progress[i];
      got[i] = RunStream(gw_address, prompts[i], so);
      done.fetch_add(1);
    });
  }
  // SIGTERM once every stream has its first token.
  const absl::Time give_up = absl::Now() + absl::Seconds(60);
  auto all_started = [&] {
    for (auto& p : progress)
      if (p.load() == 0) return false;
    return true;
  };
  while (!all_started() && absl::Now() < give_up) absl::SleepFor(absl::Milliseconds(1));
  ASSERT_TRUE(all_started());
  ASSERT_TRUE((*mesh)->Signal("gateway", SIGTERM).ok());

  // While it drains, a new connection is refused.
  grpc::StatusCode probe = grpc::StatusCode::OK;
  for (int i = 0; i < 100 && probe != grpc::StatusCode::UNAVAILABLE; ++i) {
    probe = ProbeNewConnection(gw_address);
    if (probe != grpc::StatusCode::UNAVAILABLE) absl::SleepFor(absl::Milliseconds(20));
  }
  const int done_at_refusal = done.load();
  EXPECT_EQ(probe, grpc::StatusCode::UNAVAILABLE);
  EXPECT_LT(done_at_refusal, kStreams) << "every stream had ended before new work was refused";

  for (auto& t : threads) t.join();
  for (int i = 0; i < kStreams; ++i) {
    EXPECT_TRUE(got[i].status.ok()) << "stream " << i << ": " << got[i].status.error_message();
    EXPECT_TRUE(got[i].finished) << "stream " << i;
    EXPECT_EQ(got[i].tokens, want[i]) << "stream " << i;
  }

  const int status = WaitExitNoReap((*mesh)->gateway().pid, absl::Seconds(60));
  EXPECT_TRUE(status >= 0 && WIFEXITED(status) && WEXITSTATUS(status) == 0)
      << "gateway wait status " << status << "\n"
      << Tail((*mesh)->gateway().log);
  const auto exited = (*mesh)->Reap();
  EXPECT_NE(std::find(exited.begin(), exited.end(), "gateway"), exited.end());
  EXPECT_EQ(ProbeNewConnection(gw_address), grpc::StatusCode::UNAVAILABLE);
  // The rest of the mesh stops cleanly (the gateway is already reaped and not counted).
  auto stopped = (*mesh)->Stop();
  EXPECT_TRUE(stopped.ok()) << stopped;
}

// A worker drained by SIGTERM mid-generation loses nothing. A call that reaches the draining
// worker as it shuts down can come back CANCELLED (gRPC cancels calls the server had not yet
// matched); ReplicaSet::Try (services/rpc/remote_expert_group.cc) retries a CANCELLED the caller
// did not ask for on the other replica, and the gateway retries a failed step as well.
TEST_F(DeadlineCancelTest, WorkerSigtermLosesNoRequest) {
  MeshOptions o = TestMeshOptions(*model_, dir_->Join("work-drain-worker"), 2, 2);
  o.metrics = true;
  auto mesh = Mesh::Start(o);
  ASSERT_TRUE(mesh.ok()) << mesh.status();
  const std::string gw_address = (*mesh)->gateway_address();

  const int kStreams = 8, kMax = 48;
  std::vector<std::vector<int32_t>> prompts;
  for (int i = 0; i < kStreams; ++i) prompts.push_back(Prompt(3 + 4 * i, 40 + i));
  const auto want = GenerateInproc(*model_, prompts, kMax);

  std::atomic<int> progress{0};
  std::vector<Stream> got(kStreams);
  std::vector<std::thread> threads;
  for (int i = 0; i < kStreams; ++i) {
    threads.emplace_back([&, i] {
      StreamOptions so;
      so.max_tokens = kMax;
      so.progress = &progress;
      got[i] = RunStream(gw_address, prompts[i], so);
    });
  }
  const absl::Time give_up = absl::Now() + absl::Seconds(60);
  while (progress.load() < 16 && absl::Now() < give_up) absl::SleepFor(absl::Milliseconds(1));
  const int at_signal = progress.load();
  const Mesh::Process* victim = nullptr;
  for (const auto& w : (*mesh)->workers())
    if (w.name == "worker-g1-r0") victim = &w;
  ASSERT_NE(victim, nullptr);
  ASSERT_TRUE((*mesh)->Signal(victim->name, SIGTERM).ok());
  for (auto& t : threads) t.join();
  EXPECT_LT(at_signal, kStreams * kMax) << "the signal landed after generation ended";

  for (int i = 0; i < kStreams; ++i) {
    EXPECT_TRUE(got[i].status.ok()) << "stream " << i << ": " << got[i].status.error_message();
    EXPECT_TRUE(got[i].finished) << "stream " << i;
    EXPECT_EQ(got[i].tokens, want[i]) << "stream " << i;
  }
  const int status = WaitExitNoReap(victim->pid, absl::Seconds(30));
  EXPECT_TRUE(status >= 0 && WIFEXITED(status) && WEXITSTATUS(status) == 0)
      << "worker wait status " << status << "\n"
      << Tail(victim->log);
  const auto exited = (*mesh)->Reap();
  EXPECT_NE(std::find(exited.begin(), exited.end(), "worker-g1-r0"), exited.end());
  // The router met the draining replica (equally loaded replicas take turns) and retried
  // those calls on replica 1 of the group.
  auto router_metrics = MetricsAddressFromLog((*mesh)->router().log);
  ASSERT_TRUE(router_metrics.ok()) << router_metrics.status();
  auto text = ScrapeMetrics(*router_metrics);
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_GE(SumSamples(*text, "moemesh_replica_retries_total", {{"group", "1"}}), 1);

  // Still serving on the surviving replica, with the same tokens.
  auto gw = GatewayClient(gw_address);
  auto again = GenerateViaGateway(gw.get(), prompts[1], 12);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(*again, std::vector<int32_t>(want[1].begin(), want[1].begin() + 12));
  auto stopped = (*mesh)->Stop();
  EXPECT_TRUE(stopped.ok()) << stopped;
}

}  // namespace
}  // namespace moemesh::testing
