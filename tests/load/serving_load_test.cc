// Load under memory pressure (issue 9, section 5, the memory and fairness half): 64
// concurrent greedy streams with mixed prompt lengths (16 to 2,000 tokens, half of them
// behind a shared 256-token prefix) for up to 60 s against 2 groups × 2 replicas, with a KV
// cache far too small for all of them at once. Every stream must equal the single-process
// engine, and nothing may fail; the test reports completed requests, p50/p99 time to first
// token and inter-token latency, preemptions and the prefix-cache hit rate, and each
// process's RSS once warm and at the end, which must stay within 10%. Loops are bounded by
// time and by count; nothing is asserted on speed.
#include <algorithm>
#include <atomic>
#include <fstream>
#include <iostream>
#include <map>
#include <thread>

#include "absl/strings/str_cat.h"
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
constexpr int kMaxRequestsPerStream = 40;

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

Timed TimedGenerate(v1::Gateway::Stub* stub, const std::vector<int32_t>& prompt) {
  Timed t;
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(120)));
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

TEST(ServingLoadTest, SmallKvCacheUnderMixedLoadKeepsEveryStreamExact) {
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
  auto mesh = Mesh::Start(o);
  ASSERT_TRUE(mesh.ok()) << mesh.status();
  const std::string address = (*mesh)->gateway_address();
  std::vector<std::pair<std::string, pid_t>> procs = {{"gateway", (*mesh)->gateway().pid},
                                                      {"router", (*mesh)->router().pid}};
  for (const auto& w : (*mesh)->workers()) procs.push_back({w.name, w.pid});

  absl::Mutex mu;
  std::vector<double> ttft, itl;
  std::map<std::string, int> errors;
  std::map<std::string, std::string> first_error;
  int completed = 0, mismatched = 0;
  std::map<std::string, int64_t> rss_warm;
  std::atomic<int> warm_streams{0};
  const absl::Time end = absl::Now() + kRunFor;
  std::vector<std::thread> threads;
  for (int c = 0; c < kStreams; ++c) {
    threads.emplace_back([&, c] {
      auto gw = GatewayClient(address);
      for (int r = 0; r < kMaxRequestsPerStream && absl::Now() < end; ++r) {
        const size_t i = (c * 7 + r * 5) % prompts.size();
        Timed t = TimedGenerate(gw.get(), prompts[i]);
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
        if (r == 0 && ++warm_streams == kStreams) {
          // Every stream has finished one request: the pool and caches are warm.
          for (const auto& [name, pid] : procs) rss_warm[name] = RssBytes(pid);
        }
      }
    });
  }
  for (auto& t : threads) t.join();

  auto maddr = MetricsAddressFromLog((*mesh)->gateway().log);
  ASSERT_TRUE(maddr.ok()) << maddr.status();
  auto text = ScrapeMetrics(*maddr);
  ASSERT_TRUE(text.ok()) << text.status();
  const double preemptions = SumSamples(*text, "moemesh_preemptions_total");
  const double query = SumSamples(*text, "moemesh_prefix_cache_query_tokens_total");
  const double hit = SumSamples(*text, "moemesh_prefix_cache_hit_tokens_total");

  std::cerr << "completed " << completed << ", mismatched " << mismatched << ", errors "
            << errors.size() << "\n";
  for (const auto& [code, n] : errors) {
    std::cerr << "  " << code << ": " << n << ", first: " << first_error[code] << "\n";
  }
  std::cerr << "ttft p50 " << Percentile(ttft, 0.5) << " s, p99 " << Percentile(ttft, 0.99)
            << " s; inter-token p50 " << Percentile(itl, 0.5) << " s, p99 " << Percentile(itl, 0.99)
            << " s\n";
  std::cerr << "preemptions " << preemptions << ", prefix cache hit rate "
            << (query > 0 ? hit / query : 0) << " (" << hit << " / " << query << " tokens)\n";
  for (const auto& [name, pid] : procs) {
    const int64_t now = RssBytes(pid);
    const int64_t warm = rss_warm.count(name) ? rss_warm[name] : -1;
    std::cerr << "rss " << name << ": warm " << warm / (1 << 20) << " MiB, end " << now / (1 << 20)
              << " MiB\n";
    if (warm > 0 && now > 0) {
      EXPECT_LE(static_cast<double>(now), 1.10 * static_cast<double>(warm))
          << name << " grew more than 10% once warm";
    }
  }

  EXPECT_TRUE(errors.empty()) << "no error was provoked, so none is allowed";
  EXPECT_EQ(mismatched, 0) << "greedy streams must equal the single-process engine";
  EXPECT_GE(completed, kStreams) << "every stream finished at least one request";
  EXPECT_GT(preemptions, 0) << "the cache was meant to run out";
  EXPECT_GT(hit, 0) << "the shared prefix should hit the prefix cache";
  auto stopped = (*mesh)->Stop();
  EXPECT_TRUE(stopped.ok()) << stopped;
}

}  // namespace
}  // namespace moemesh::testing
