// Load under memory pressure (issue 9, section 5, the memory and fairness half): 64
// concurrent greedy streams with mixed prompt lengths (16 to 2,000 tokens, half of them
// behind a shared 256-token prefix) for up to 60 s against 2 groups × 2 replicas, with a KV
// cache far too small for all of them at once. Every stream must equal the single-process
// engine, and nothing may fail; the test reports completed requests, p50/p99 time to first
// token and inter-token latency, preemptions and the prefix-cache hit rate, and each
// process's RSS once warm and at the end, which must stay within 10%. Loops are bounded by
// time and by count (a stream goes past its count only while faults or provoked requests are
// still to come, so that they always meet a loaded mesh); nothing is asserted on speed.
//
// Faults during the load (the availability half): one replica of group 1 is SIGKILLed and
// later started again on the same port with the same experts, and, at another time, one
// replica of group 0 is SIGSTOPped for 3 s and then continued. Only processes this test
// started are signalled, by pid (through Mesh). A few requests are sent with a deadline far
// too short on purpose; they must end DEADLINE_EXCEEDED and are counted apart. Every other
// request must complete with the single-process engine's tokens: the router routes around the
// dead or stopped replica. The report adds the fault timeline (when, which pid, requests in
// flight) and errors by code; set MOEMESH_LOAD_REPORT=FILE to also get it as JSON.
#include <signal.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <set>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "tests/mesh_util.h"
#include "tests/metrics_scrape.h"
#include "tests/test_util.h"

namespace moemesh::testing {
namespace {

constexpr int kVocab = 128;
constexpr int kStreams = 64;
constexpr int kMaxTokens = 32;
constexpr absl::Duration kRunFor = absl::Seconds(60);
// Requests per stream, unless the fault schedule and the provoked requests have not all run by
// then: the streams carry on (until kRunFor at the most) so that every fault and every
// provoked request lands on a loaded mesh, on a fast machine as on a slow one.
constexpr int kMaxRequestsPerStream = 40;
// Requests sent with a deadline far too short for 32 tokens (the only errors allowed).
constexpr int kProvoked = 10;
constexpr absl::Duration kProvokedDeadline = absl::Milliseconds(200);
// Workers' RSS baselines are taken this long after the last fault: a standby replica first
// carries traffic (and maps its experts' pages) during a fault, and the restarted one starts
// cold. The gateway and router are measured from the moment every stream has completed once.
constexpr absl::Duration kSettle = absl::Seconds(5);

// The faults, in load time. The kill comes once the first requests are under way; the stop
// long after the restarted replica is back, so the two never overlap. Both hit replica 0 of
// their group: with one gateway the router seldom has two calls to one group in flight, and
// it prefers replica 0 on ties, so replica 0 carries the group's traffic and replica 1 stands
// by until a fault moves the traffic to it.
constexpr char kKilled[] = "worker-g1-r0";
constexpr char kStopped[] = "worker-g0-r0";
constexpr absl::Duration kKillAt = absl::Seconds(12);
constexpr absl::Duration kRestartAt = absl::Seconds(17);
constexpr absl::Duration kStopAt = absl::Seconds(30);
constexpr absl::Duration kStopFor = absl::Seconds(3);

int64_t RssBytes(pid_t pid) {
  std::ifstream in(absl::StrCat("/proc/", pid, "/status"));
  std::string key;
  while (in >> key) {
    if (key == "VmRSS:") {
      int64_t kib = 0;
      in >> kib;
      return kib * 1024;
    }
  }
  return -1;
}

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(p * static_cast<double>(v.size())))];
}

struct Timed {
  absl::Status status;
  std::vector<int32_t> tokens;
  double ttft = 0;
  std::vector<double> gaps;  // between consecutive tokens
};

Timed TimedGenerate(v1::Gateway::Stub* stub, const std::vector<int32_t>& prompt,
                    absl::Duration deadline = absl::Seconds(120)) {
  Timed t;
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + deadline));
  // A client channel still connecting (64 of them start at once on a loaded machine) waits
  // instead of failing at once with UNAVAILABLE.
  ctx.set_wait_for_ready(true);
  v1::GenerateRequest req;
  req.mutable_prompt_tokens()->mutable_ids()->Add(prompt.begin(), prompt.end());
  req.set_max_tokens(kMaxTokens);
  const absl::Time start = absl::Now();
  absl::Time last = start;
  auto reader = stub->Generate(&ctx, req);
  v1::GenerateResponse resp;
  while (reader->Read(&resp)) {
    for (int32_t id : resp.token_ids()) {
      const absl::Time now = absl::Now();
      if (t.tokens.empty()) {
        t.ttft = absl::ToDoubleSeconds(now - start);
      } else {
        t.gaps.push_back(absl::ToDoubleSeconds(now - last));
      }
      last = now;
      t.tokens.push_back(id);
    }
  }
  grpc::Status s = reader->Finish();
  if (!s.ok())
    t.status = absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
  return t;
}

TEST(ServingLoadTest, SmallKvCacheAndReplicaFaultsUnderMixedLoadKeepEveryStreamExact) {
  TempDir dir;
  GeneratorOptions g;
  g.config = SmallMixtralConfig(kVocab, 64, 96, 3, 4, 2, 8, 2);
  g.seed = 21;
  const std::string model = MakeModel(dir, "model", g);

  // 32 distinct prompts, 16 to 2,000 tokens; odd ones start with a shared 256-token prefix.
  std::vector<int32_t> prefix;
  for (int j = 0; j < 256; ++j) prefix.push_back((j * 13 + 7) % kVocab);
  std::vector<std::vector<int32_t>> prompts;
  for (int i = 0; i < 32; ++i) {
    const bool shared = i % 2 == 1;
    const size_t len = i % 8 == 0 ? 2000 : 16 + (i * 97) % 700 + (shared ? 256 : 0);
    std::vector<int32_t> p = shared ? prefix : std::vector<int32_t>{};
    for (int j = 0; p.size() < len; ++j) p.push_back((j * 31 + i * 17 + 3) % kVocab);
    prompts.push_back(std::move(p));
  }
  const auto want = GenerateInproc(model, prompts, kMaxTokens);
  ASSERT_EQ(want.size(), prompts.size());

  // A block is 16 tokens × 3 layers × 64 floats × 4 bytes; 400 blocks hold 6,400 tokens,
  // against ~20,000 that 64 streams want at once.
  const int64_t blocks = 400;
  MeshOptions o = TestMeshOptions(model, dir.Join("work"), 2, 2);
  o.metrics = true;
  o.gateway_args = {absl::StrCat("--kv_cache_bytes=", blocks * 16 * 3 * 64 * 4), "--max_running=64",
                    "--max_step_tokens=512"};
  // A worker attempt that gets no answer (the stopped replica) is given up after 2 s and
  // retried on the other replica; the default (30 s) would only make the stall longer. Still
  // shorter than the stop (kStopFor), so the stop must be routed around, and long enough that
  // a healthy replica starved of CPU by 64 streams on a small machine is not given up on.
  o.router_args = {"--attempt_timeout=2"};
  auto mesh = Mesh::Start(o);
  ASSERT_TRUE(mesh.ok()) << mesh.status();
  const std::string address = (*mesh)->gateway_address();
  // Pids are looked up through the mesh whenever they are needed: a restart changes one.
  std::vector<std::string> names = {"gateway", "router"};
  for (const auto& w : (*mesh)->workers()) names.push_back(w.name);
  std::map<std::string, int64_t> rss_start, rss_warm;
  for (const auto& n : names) rss_start[n] = RssBytes((*mesh)->Pid(n));

  absl::Mutex mu;
  std::vector<double> ttft, itl;
  std::map<std::string, int> errors;    // requests that were meant to complete, by code
  std::map<std::string, int> provoked;  // the short-deadline requests, by code
  std::map<std::string, std::string> first_error;
  int completed = 0, mismatched = 0;
  std::atomic<int> in_flight{0}, warm_streams{0}, streams_done{0};
  // Set once every fault has been injected and every provoked request has ended.
  std::atomic<bool> provoked_done{false}, schedule_done{false};
  const absl::Time load_start = absl::Now();
  const absl::Time end = load_start + kRunFor;
  std::vector<std::thread> threads;
  for (int c = 0; c < kStreams; ++c) {
    threads.emplace_back([&, c] {
      auto gw = GatewayClient(address);
      for (int r = 0; absl::Now() < end && (r < kMaxRequestsPerStream || !schedule_done.load());
           ++r) {
        const size_t i = (c * 7 + r * 5) % prompts.size();
        ++in_flight;
        Timed t = TimedGenerate(gw.get(), prompts[i]);
        --in_flight;
        absl::MutexLock lock(&mu);
        if (!t.status.ok()) {
          const std::string code = absl::StatusCodeToString(t.status.code());
          if (errors[code]++ == 0) first_error[code] = std::string(t.status.message());
          continue;
        }
        ++completed;
        if (t.tokens != want[i]) ++mismatched;
        ttft.push_back(t.ttft);
        itl.insert(itl.end(), t.gaps.begin(), t.gaps.end());
        if (r == 0) ++warm_streams;
      }
      ++streams_done;
    });
  }
  // Requests that cannot finish in time, spread over the load: each must end with
  // DEADLINE_EXCEEDED (and its blocks go back to the pool), never hang or fail otherwise.
  threads.emplace_back([&] {
    auto gw = GatewayClient(address);
    for (int k = 0; k < kProvoked; ++k) {
      absl::SleepFor(load_start + absl::Seconds(2) + k * (kRunFor - absl::Seconds(4)) / kProvoked -
                     absl::Now());
      const size_t i = (k * 3) % prompts.size();
      ++in_flight;
      Timed t = TimedGenerate(gw.get(), prompts[i], kProvokedDeadline);
      --in_flight;
      absl::MutexLock lock(&mu);
      ++provoked[absl::StatusCodeToString(t.status.code())];
      if (t.status.ok() && t.tokens != want[i]) ++mismatched;
    }
    provoked_done = true;
  });

  // The fault timeline runs on this thread: Mesh is not thread-safe, and a process started
  // again must be forked by a thread that outlives it (PR_SET_PDEATHSIG follows the thread).
  struct Event {
    double at_s;
    std::string what, process;
    pid_t pid;
    int in_flight, completed, errors;
    std::string note;
  };
  std::vector<Event> timeline;
  auto record = [&](const std::string& what, const std::string& process, pid_t pid,
                    const std::string& note = "") {
    absl::MutexLock lock(&mu);
    int errs = 0;
    for (const auto& [code, n] : errors) errs += n;
    timeline.push_back({absl::ToDoubleSeconds(absl::Now() - load_start), what, process, pid,
                        in_flight.load(), completed, errs, note});
  };
  struct Fault {
    absl::Duration at;
    std::string what, process;
  };
  const std::vector<Fault> faults = {{kKillAt, "SIGKILL", kKilled},
                                     {kRestartAt, "restart", kKilled},
                                     {kStopAt, "SIGSTOP", kStopped},
                                     {kStopAt + kStopFor, "SIGCONT", kStopped}};
  size_t next_fault = 0;
  bool is_stopped = false, warm = false;
  std::set<std::string> down;
  std::map<std::string, absl::Time> restarted_at;
  while (streams_done.load() < kStreams) {
    const absl::Time now = absl::Now();
    if (next_fault < faults.size() && now - load_start >= faults[next_fault].at) {
      const Fault& f = faults[next_fault++];
      const pid_t pid = (*mesh)->Pid(f.process);
      if (f.what == "restart") {
        record("restart", f.process, pid, "old pid, reaped");
        const absl::Time t0 = absl::Now();
        const absl::Status s = (*mesh)->Restart(f.process);
        EXPECT_TRUE(s.ok()) << s;
        restarted_at[f.process] = absl::Now();
        down.erase(f.process);
        rss_warm.erase(f.process);
        rss_start[f.process] = RssBytes((*mesh)->Pid(f.process));
        record("serving again", f.process, (*mesh)->Pid(f.process),
               absl::StrFormat("same port, %.2f s to SERVING",
                               absl::ToDoubleSeconds(absl::Now() - t0)));
      } else {
        const int sig = f.what == "SIGKILL" ? SIGKILL : f.what == "SIGSTOP" ? SIGSTOP : SIGCONT;
        const absl::Status s = (*mesh)->Signal(f.process, sig);
        EXPECT_TRUE(s.ok()) << f.what << " " << f.process << ": " << s;
        if (sig == SIGKILL) down.insert(f.process);
        if (sig == SIGSTOP) is_stopped = s.ok();
        if (sig == SIGCONT) is_stopped = false;
        record(f.what, f.process, pid);
      }
    }
    if (next_fault == faults.size() && provoked_done.load()) schedule_done = true;
    if (!warm && warm_streams.load() == kStreams) {
      warm = true;
      record("warm", "", -1, "every stream has completed a request");
    }
    // RSS baselines: the gateway and router once warm, the workers kSettle after the last
    // fault (so the restarted worker is measured from its restart).
    const bool settled =
        next_fault == faults.size() && now - load_start >= faults.back().at + kSettle;
    for (const auto& n : names) {
      if (rss_warm.count(n) || down.count(n)) continue;
      const bool worker = absl::StartsWith(n, "worker");
      if (warm && (!worker || settled)) rss_warm[n] = RssBytes((*mesh)->Pid(n));
    }
    absl::SleepFor(absl::Milliseconds(50));
  }
  if (is_stopped) {
    EXPECT_TRUE((*mesh)->Signal(kStopped, SIGCONT).ok());
  }
  record("load over", "", -1, "every stream has finished");
  for (auto& t : threads) t.join();
  EXPECT_EQ(next_fault, faults.size()) << "the load ended before every fault was injected";
  const double wall = absl::ToDoubleSeconds(absl::Now() - load_start);

  auto scrape = [](const std::string& log, bool last) -> absl::StatusOr<std::string> {
    std::string text = ReadFileOrDie(log);
    const size_t at = last ? text.rfind("metrics on ") : text.find("metrics on ");
    if (at == std::string::npos) return absl::NotFoundError(log + " names no metrics port");
    const size_t b = at + std::string("metrics on ").size();
    return ScrapeMetrics(text.substr(b, text.find_first_of(" \t\r\n", b) - b));
  };
  auto text = scrape((*mesh)->gateway().log, false);
  ASSERT_TRUE(text.ok()) << text.status();
  const double preemptions = SumSamples(*text, "moemesh_preemptions_total");
  const double query = SumSamples(*text, "moemesh_prefix_cache_query_tokens_total");
  const double hit = SumSamples(*text, "moemesh_prefix_cache_hit_tokens_total");
  auto rtext = scrape((*mesh)->router().log, false);
  ASSERT_TRUE(rtext.ok()) << rtext.status();
  const double replica_retries = SumSamples(*rtext, "moemesh_replica_retries_total");
  // The gateway logs every failed router-call attempt it retries.
  int layer_retries = 0;
  {
    const std::string log = ReadFileOrDie((*mesh)->gateway().log);
    for (size_t at = log.find("gateway: router "); at != std::string::npos;
         at = log.find("gateway: router ", at + 1))
      ++layer_retries;
  }
  // The restarted replica takes work again (its log holds both lives; the last port is its).
  std::string killed_log;
  for (const auto& w : (*mesh)->workers())
    if (w.name == kKilled) killed_log = w.log;
  auto ktext = scrape(killed_log, true);
  ASSERT_TRUE(ktext.ok()) << ktext.status();
  const double restarted_calls =
      SumSamples(*ktext, "moemesh_requests_total", {{"method", "RunExperts"}, {"code", "OK"}});

  // ---- the report ----
  std::map<std::string, int64_t> rss_end;
  for (const auto& n : names) rss_end[n] = RssBytes((*mesh)->Pid(n));
  std::string out;
  absl::StrAppendFormat(&out, "\n== serving load: %d streams, %.0f s of load, %.1f s in all ==\n",
                        kStreams, absl::ToDoubleSeconds(kRunFor), wall);
  absl::StrAppendFormat(&out, "completed %d, mismatched greedy streams %d\n", completed,
                        mismatched);
  absl::StrAppend(&out, "errors (not provoked):", errors.empty() ? " none" : "", "\n");
  for (const auto& [code, n] : errors)
    absl::StrAppendFormat(&out, "  %-20s %5d  first: %s\n", code, n, first_error[code]);
  absl::StrAppendFormat(&out, "provoked (%d requests, %s deadline):", kProvoked,
                        absl::FormatDuration(kProvokedDeadline));
  for (const auto& [code, n] : provoked) absl::StrAppendFormat(&out, " %s %d", code, n);
  absl::StrAppendFormat(&out,
                        "\nTTFT p50 %.3f s, p99 %.3f s; inter-token p50 %.3f s, p99 %.3f s, "
                        "max %.3f s\n",
                        Percentile(ttft, 0.5), Percentile(ttft, 0.99), Percentile(itl, 0.5),
                        Percentile(itl, 0.99), Percentile(itl, 1.0));
  absl::StrAppendFormat(&out, "preemptions %.0f, prefix cache hit rate %.3f (%.0f / %.0f tokens)\n",
                        preemptions, query > 0 ? hit / query : 0, hit, query);
  absl::StrAppendFormat(&out,
                        "router replica retries %.0f, gateway router-call retries %d, RunExperts "
                        "served by %s after its restart %.0f\n",
                        replica_retries, layer_retries, kKilled, restarted_calls);
  absl::StrAppend(&out, "fault timeline:\n");
  absl::StrAppendFormat(&out, "  %7s  %-14s %-14s %7s  %9s %9s %6s  %s\n", "t (s)", "event",
                        "process", "pid", "in flight", "completed", "errors", "");
  for (const Event& e : timeline)
    absl::StrAppendFormat(&out, "  %7.2f  %-14s %-14s %7s  %9d %9d %6d  %s\n", e.at_s, e.what,
                          e.process, e.pid > 0 ? absl::StrCat(e.pid) : "", e.in_flight, e.completed,
                          e.errors, e.note);
  absl::StrAppend(&out, "RSS (MiB; start: a restarted worker's at its restart; warm: gateway and ",
                  "router when every stream has completed once, workers ",
                  absl::FormatDuration(kSettle), " after the last fault):\n");
  absl::StrAppendFormat(&out, "  %-14s %7s %7s %7s  %s\n", "process", "start", "warm", "end",
                        "end/warm");
  auto mib = [](int64_t b) { return static_cast<double>(b) / (1 << 20); };
  for (const auto& n : names) {
    const int64_t w = rss_warm.count(n) ? rss_warm[n] : -1;
    absl::StrAppendFormat(&out, "  %-14s %7.1f %7.1f %7.1f  %.3f%s\n", n, mib(rss_start[n]), mib(w),
                          mib(rss_end[n]),
                          w > 0 ? static_cast<double>(rss_end[n]) / static_cast<double>(w) : 0,
                          restarted_at.count(n) ? "  (restarted)" : "");
  }
  std::cerr << out;

  if (const char* path = std::getenv("MOEMESH_LOAD_REPORT"); path != nullptr && *path) {
    std::vector<std::string> ev, rss, errs, prov;
    for (const Event& e : timeline)
      ev.push_back(absl::StrFormat(
          R"({"t_s":%.3f,"event":"%s","process":"%s","pid":%d,"in_flight":%d,"completed":%d,)"
          R"("errors":%d})",
          e.at_s, e.what, e.process, e.pid, e.in_flight, e.completed, e.errors));
    for (const auto& n : names)
      rss.push_back(absl::StrFormat(R"("%s":{"start":%d,"warm":%d,"end":%d,"restarted":%s})", n,
                                    rss_start[n], rss_warm.count(n) ? rss_warm[n] : -1, rss_end[n],
                                    restarted_at.count(n) ? "true" : "false"));
    for (const auto& [code, n] : errors) errs.push_back(absl::StrFormat(R"("%s":%d)", code, n));
    for (const auto& [code, n] : provoked) prov.push_back(absl::StrFormat(R"("%s":%d)", code, n));
    std::ofstream(path) << absl::StrFormat(
        R"({"streams":%d,"load_s":%.0f,"wall_s":%.1f,"completed":%d,"mismatched":%d,)"
        R"("errors":{%s},"provoked":{%s},"ttft_s":{"p50":%.4f,"p99":%.4f},)"
        R"("itl_s":{"p50":%.4f,"p99":%.4f,"max":%.4f},"preemptions":%.0f,"prefix_hit_tokens":%.0f,)"
        R"("prefix_query_tokens":%.0f,"replica_retries":%.0f,"gateway_router_retries":%d,)"
        R"("faults":[%s],"rss_bytes":{%s}})"
        "\n",
        kStreams, absl::ToDoubleSeconds(kRunFor), wall, completed, mismatched,
        absl::StrJoin(errs, ","), absl::StrJoin(prov, ","), Percentile(ttft, 0.5),
        Percentile(ttft, 0.99), Percentile(itl, 0.5), Percentile(itl, 0.99), Percentile(itl, 1.0),
        preemptions, hit, query, replica_retries, layer_retries, absl::StrJoin(ev, ","),
        absl::StrJoin(rss, ","));
  }

  for (const auto& n : names) {
    const int64_t w = rss_warm.count(n) ? rss_warm[n] : -1;
    EXPECT_GT(w, 0) << n << " has no warm RSS";
    if (w > 0 && rss_end[n] > 0) {
      EXPECT_LE(static_cast<double>(rss_end[n]), 1.10 * static_cast<double>(w))
          << n << " grew more than 10% once warm";
    }
  }
  EXPECT_TRUE(errors.empty()) << "only the provoked deadlines may fail";
  EXPECT_EQ(provoked["DEADLINE_EXCEEDED"], kProvoked)
      << "every short-deadline request ends DEADLINE_EXCEEDED";
  EXPECT_EQ(mismatched, 0) << "greedy streams must equal the single-process engine";
  EXPECT_GE(completed, kStreams) << "every stream finished at least one request";
  EXPECT_GT(preemptions, 0) << "the cache was meant to run out";
  EXPECT_GT(hit, 0) << "the shared prefix should hit the prefix cache";
  EXPECT_GT(replica_retries, 0) << "the router should have retried around the faults";
  EXPECT_GT(restarted_calls, 0) << "the router should send work to the restarted replica";
  auto stopped = (*mesh)->Stop();
  EXPECT_TRUE(stopped.ok()) << stopped;
}

}  // namespace
}  // namespace moemesh::testing
