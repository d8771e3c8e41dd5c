// Serving under pressure, in process: the paged KV cache and its bound, preemption by
// recomputation, prefix caching, the request limits, fair prefill and Score's outputs.
// Greedy tokens are always compared with a plain one-sequence-at-a-time loop on an engine
// whose cache is unbounded.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"
#include "services/engine/inproc.h"
#include "services/engine/kv_cache.h"
#include "services/engine/scheduler.h"
#include "services/engine/score_outputs.h"
#include "services/model/generator.h"
#include "tests/test_util.h"

namespace moemesh {
namespace {

using ::moemesh::testing::MaxAbsDiff;
using ::moemesh::testing::TempDir;

std::vector<int32_t> Prompt(int n, int salt, int vocab = 96) {
  std::vector<int32_t> t;
  for (int i = 0; i < n; ++i) t.push_back((i * 37 + salt * 11 + 5) % vocab);
  return t;
}

// Greedy decoding by hand on a fresh sequence: prefill, then one token at a time.
std::vector<int32_t> ManualGreedy(Engine& e, const std::vector<int32_t>& prompt, int n) {
  auto seq = e.NewSequence();
  std::vector<int32_t> out;
  std::vector<int32_t> feed = prompt;
  for (int i = 0; i < n; ++i) {
    StepInput in{seq.get(), feed, false};
    auto r = e.Step({&in, 1});
    EXPECT_TRUE(r.ok()) << r.status();
    if (!r.ok()) break;
    const float* row = (*r)[0].row((*r)[0].dim(0) - 1);
    out.push_back(static_cast<int32_t>(std::max_element(row, row + (*r)[0].dim(1)) - row));
    feed = {out.back()};
  }
  return out;
}

struct Outcome {
  std::vector<int32_t> tokens;
  absl::Status status;
  std::string finish_reason;
  Tensor logits;
  bool done = false;
};

// Runs every request through `sched` and waits for them all. Events are held until every
// request is queued, so the scheduler sees them together.
std::vector<Outcome> RunAll(Scheduler& sched, const std::vector<GenerationRequest>& reqs,
                            std::vector<int>* first_token_order = nullptr) {
  struct State {
    absl::Mutex mu;
    std::vector<Outcome> out;
    std::vector<int> order;
    int remaining = 0;
    bool all_submitted = false;
  };
  auto st = std::make_shared<State>();
  st->out.resize(reqs.size());
  st->remaining = static_cast<int>(reqs.size());
  for (size_t i = 0; i < reqs.size(); ++i) {
    absl::Status s = sched.Submit(reqs[i], [st, i](const GenerationEvent& ev) {
      absl::MutexLock lock(&st->mu);
      st->mu.Await(absl::Condition(&st->all_submitted));
      Outcome& o = st->out[i];
      if (!ev.done) {
        if (o.tokens.empty()) st->order.push_back(static_cast<int>(i));
        o.tokens.push_back(ev.token);
        return;
      }
      o.status = ev.status;
      o.finish_reason = ev.finish_reason;
      o.logits = ev.logits;
      o.done = true;
      --st->remaining;
    });
    EXPECT_TRUE(s.ok()) << s;
    if (!s.ok()) {
      absl::MutexLock lock(&st->mu);
      --st->remaining;
    }
  }
  absl::MutexLock lock(&st->mu);
  st->all_submitted = true;
  EXPECT_TRUE(st->mu.AwaitWithTimeout(absl::Condition(
                                          +[](int* r) { return *r == 0; }, &st->remaining),
                                      absl::Seconds(120)))
      << "requests did not finish";
  if (first_token_order != nullptr) *first_token_order = st->order;
  return st->out;
}

// A bounded cache of `blocks` blocks of 16 tokens for `e`.
void Bound(Engine& e, int64_t blocks, DType dtype = DType::kF32) {
  const int64_t block_bytes = e.config().num_layers * 16 * e.cache_floats_per_token_per_layer() *
                              (dtype == DType::kBF16 ? 2 : 4);
  ASSERT_TRUE(e.ConfigureKvCache({.bytes = blocks * block_bytes, .dtype = dtype}).ok());
  ASSERT_EQ(e.kv_cache().total_blocks(), blocks);
}

class ServingTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir();
    GeneratorOptions o;
    o.config = SmallMixtralConfig();
    o.seed = 7;
    model_ = new std::string(moemesh::testing::MakeModel(*dir_, "mixtral", o));
    GeneratorOptions d;
    d.config = SmallDeepseekConfig(96, 64, 3);
    d.config.max_position_embeddings = 512;
    d.seed = 11;
    deepseek_ = new std::string(moemesh::testing::MakeModel(*dir_, "deepseek", d));
  }
  static void TearDownTestSuite() {
    delete model_;
    delete deepseek_;
    delete dir_;
  }
  static std::unique_ptr<InprocModel> Load(const std::string& path) {
    auto m = InprocModel::Load(path);
    EXPECT_TRUE(m.ok()) << m.status();
    return m.ok() ? std::move(*m) : nullptr;
  }
  static TempDir* dir_;
  static std::string* model_;
  static std::string* deepseek_;
};

TempDir* ServingTest::dir_ = nullptr;
std::string* ServingTest::model_ = nullptr;
std::string* ServingTest::deepseek_ = nullptr;

TEST(KvCacheTest, PoolIsBoundedAndBlocksComeBack) {
  auto kv = KvCache::Create({.bytes = 10 * 2 * 16 * 8 * 4}, /*layers=*/2, /*row=*/8);
  ASSERT_TRUE(kv.ok()) << kv.status();
  KvCache& c = **kv;
  EXPECT_EQ(c.total_blocks(), 10);
  std::vector<int32_t> a, b;
  ASSERT_TRUE(c.Allocate(7, &a));
  EXPECT_FALSE(c.Allocate(4, &b)) << "only 3 blocks are left";
  EXPECT_TRUE(b.empty()) << "a refused allocation takes nothing";
  ASSERT_TRUE(c.Allocate(3, &b));
  EXPECT_EQ(c.free_blocks(), 0);
  c.Release(a);
  EXPECT_EQ(c.free_blocks(), 7);
  EXPECT_EQ(c.stats().used_blocks, 3);
  EXPECT_FALSE(KvCache::Create({.bytes = 100}, 2, 8).ok()) << "smaller than one block";
  EXPECT_FALSE(ParseKvCacheDType("f16").ok());
  EXPECT_EQ(*ParseKvCacheDType("BF16"), DType::kBF16);
}

TEST(KvCacheTest, RegisteredBlocksAreSharedThenEvictedLastReleasedLast) {
  auto kv = KvCache::Create({.bytes = 2 * 1 * 16 * 4 * 4}, 1, 4);
  ASSERT_TRUE(kv.ok());
  KvCache& c = **kv;
  std::vector<int32_t> t;
  ASSERT_TRUE(c.Allocate(1, &t));
  const std::vector<int32_t> toks(16, 3);
  c.Register(t[0], 0, toks);
  EXPECT_EQ(c.Lookup(0, toks), t[0]);  // a second reference
  EXPECT_EQ(c.Lookup(1, toks), -1) << "another parent is another prefix";
  c.Release({t[0], t[0]});
  EXPECT_EQ(c.stats().cached_blocks, 1);
  EXPECT_EQ(c.free_blocks(), 2) << "a cached, unreferenced block counts as free";
  std::vector<int32_t> u;
  ASSERT_TRUE(c.Allocate(1, &u));
  EXPECT_NE(u[0], t[0]) << "never-used blocks go before cached ones";
  ASSERT_TRUE(c.Allocate(1, &u));
  EXPECT_EQ(u[1], t[0]) << "the cached block is evicted when nothing else is left";
  EXPECT_EQ(c.Lookup(0, toks), -1) << "an evicted block is no longer found";
}

// The CPU backend, except that it does not read a paged cache in place: engines on it gather
// each sequence's context into one F32 buffer per layer (the path a CUDA backend takes).
class GatheringBackend final : public ComputeBackend {
 public:
  explicit GatheringBackend(ComputeBackend* inner) : inner_(inner) {}
  std::string name() const override { return "gathering " + inner_->name(); }
  void MatMulT(const float* x, int64_t m, int64_t k, const float* w, int64_t n, float* y,
               bool accumulate) override {
    inner_->MatMulT(x, m, k, w, n, y, accumulate);
  }
  void MatMulW(const float* x, int64_t m, const Weight& w, float* y, bool accumulate) override {
    inner_->MatMulW(x, m, w, y, accumulate);
  }
  void ExpertFfnW(const float* x, int64_t m, const Weight& w1, const Weight& w3, const Weight& w2,
                  float* workspace, float* y) override {
    inner_->ExpertFfnW(x, m, w1, w3, w2, workspace, y);
  }
  void RmsNorm(const float* x, const float* weight, int64_t rows, int64_t dim, float eps,
               float* y) override {
    inner_->RmsNorm(x, weight, rows, dim, eps, y);
  }
  void Rope(float* x, int64_t tokens, int64_t heads, int64_t head_dim, int64_t stride,
            int64_t rot_dim, const int32_t* positions, const float* inv_freq, float mscale,
            bool interleaved) override {
    inner_->Rope(x, tokens, heads, head_dim, stride, rot_dim, positions, inv_freq, mscale,
                 interleaved);
  }
  void CausalAttention(const AttentionShape& s, const float* q, const float* k, const float* v,
                       float* out) override {
    EXPECT_EQ(s.segment_rows, 0) << "the engine used segments although the backend said no";
    inner_->CausalAttention(s, q, k, v, out);
  }
  bool SupportsSegmentedCache() const override { return false; }
  void SiluMul(const float* gate, const float* up, int64_t n, float* out) override {
    inner_->SiluMul(gate, up, n, out);
  }
  void ExpertFfn(const float* x, int64_t m, int64_t hidden, int64_t inter, const float* w1,
                 const float* w3, const float* w2, float* workspace, float* y) override {
    inner_->ExpertFfn(x, m, hidden, inter, w1, w3, w2, workspace, y);
  }
  void SoftmaxTopK(const float* logits, int64_t t, int64_t e, int k, bool renormalize, int32_t* ids,
                   float* weights) override {
    inner_->SoftmaxTopK(logits, t, e, k, renormalize, ids, weights);
  }

 private:
  ComputeBackend* inner_;
};

// A BF16 cache is read in place by decode steps (its blocks converted a few rows at a time
// inside attention; a long prefill chunk gathers it once): every step's logits are bitwise
// those of an engine that always gathers the whole context as F32, for both attention kinds
// (grouped-query, and DeepSeek's latent MLA), across block boundaries.
TEST_F(ServingTest, Bf16CacheReadInPlaceEqualsTheGatheredOne) {
  for (const std::string* path : {model_, deepseek_}) {
    auto m = Load(*path);
    GatheringBackend gathering(m->backend.get());
    auto gathered = Engine::Load(*m->checkpoint, m->config, &gathering, m->moe.get());
    ASSERT_TRUE(gathered.ok()) << gathered.status();
    const std::vector<int32_t> tokens = Prompt(60, 7, m->config.vocab_size);
    std::vector<std::vector<Tensor>> logits(2);
    int which = 0;
    for (Engine* e : {m->engine.get(), gathered->get()}) {
      ASSERT_TRUE(e->ConfigureKvCache({.dtype = DType::kBF16}).ok());
      auto seq = e->NewSequence();
      // A 25-token prefill, then one token per step (in place) and a 3-token chunk, to 60.
      for (size_t at = 0; at < tokens.size();) {
        const size_t n = at == 0 ? 25 : (at == 40 ? 3 : 1);
        StepInput in{seq.get(), absl::MakeConstSpan(tokens).subspan(at, n), false};
        auto r = e->Step({&in, 1});
        ASSERT_TRUE(r.ok()) << r.status();
        logits[which].push_back((*r)[0]);
        at += n;
      }
      ++which;
    }
    ASSERT_EQ(logits[0].size(), logits[1].size());
    for (size_t i = 0; i < logits[0].size(); ++i) {
      ASSERT_EQ(logits[0][i].numel(), logits[1][i].numel());
      EXPECT_EQ(std::memcmp(logits[0][i].data(), logits[1][i].data(),
                            logits[0][i].numel() * sizeof(float)),
                0)
          << *path << " step " << i;
    }
  }
}

TEST_F(ServingTest, Bf16CacheIsCloseToF32AndHalfTheBytes) {
  auto m = Load(*model_);
  const std::vector<int32_t> tokens = Prompt(40, 3);
  auto f32 = m->engine->Score(tokens);
  ASSERT_TRUE(f32.ok());
  const int64_t f32_block = m->engine->kv_cache().block_bytes();
  ASSERT_TRUE(m->engine->ConfigureKvCache({.dtype = DType::kBF16}).ok());
  EXPECT_EQ(m->engine->kv_cache().block_bytes() * 2, f32_block);
  auto bf16 = m->engine->Score(tokens);
  ASSERT_TRUE(bf16.ok());
  const double diff = MaxAbsDiff(f32->data(), bf16->data(), f32->numel());
  EXPECT_GT(diff, 0.0) << "the cache really is rounded";
  EXPECT_LT(diff, 0.05);
}

// Many long requests in a cache that holds a few of them: all finish with the greedy tokens
// of the unbounded engine, and memory ran out on the way (preemptions happened).
void ExpectBoundedMemoryKeepsGreedyTokens(Engine& e, int vocab) {
  const int n = 24;
  std::vector<GenerationRequest> reqs;
  std::vector<std::vector<int32_t>> want;
  for (int i = 0; i < 8; ++i) {
    GenerationRequest r;
    r.prompt = Prompt(30 + 3 * i, 100 + i, vocab);
    r.max_tokens = n;
    want.push_back(ManualGreedy(e, r.prompt, n));
    reqs.push_back(std::move(r));
  }
  // Each request alone needs at most 4 blocks of 16 (< 75 tokens); together about 32.
  Bound(e, 10);
  Scheduler sched(&e, SchedulerOptions{.max_step_tokens = 32, .max_running = 8});
  const std::vector<Outcome> got = RunAll(sched, reqs);
  for (size_t i = 0; i < reqs.size(); ++i) {
    EXPECT_TRUE(got[i].status.ok()) << i << ": " << got[i].status;
    EXPECT_EQ(got[i].finish_reason, "length");
    EXPECT_EQ(got[i].tokens, want[i]) << "request " << i;
  }
  EXPECT_GT(sched.stats().preemptions, 0) << "the cache was meant to run out";
  EXPECT_GT(sched.stats().max_batch_sequences, 1);
  EXPECT_EQ(e.kv_cache().stats().used_blocks, 0) << "every block came back";
}

TEST_F(ServingTest, BoundedMemoryPreemptsAndKeepsGreedyTokensGqa) {
  auto m = Load(*model_);
  ExpectBoundedMemoryKeepsGreedyTokens(*m->engine, 96);
}

TEST_F(ServingTest, BoundedMemoryPreemptsAndKeepsGreedyTokensMla) {
  auto m = Load(*deepseek_);
  ExpectBoundedMemoryKeepsGreedyTokens(*m->engine, 96);
}

TEST_F(ServingTest, RequestThatCanNeverFitIsRejectedAtOnce) {
  auto m = Load(*model_);
  Bound(*m->engine, 10);  // 160 tokens
  Scheduler sched(m->engine.get(), SchedulerOptions{});
  auto cb = [](const GenerationEvent&) {};
  GenerationRequest r;
  r.prompt = Prompt(100, 1);
  r.max_tokens = 100;  // 199 tokens held at most
  EXPECT_EQ(sched.Submit(r, cb).code(), absl::StatusCode::kResourceExhausted);
  r.score_only = true;
  r.prompt = Prompt(161, 1);
  EXPECT_EQ(sched.Submit(r, cb).code(), absl::StatusCode::kResourceExhausted);
  // 100 + 61 - 1 = 160 tokens fit exactly.
  r.score_only = false;
  r.prompt = Prompt(100, 1);
  r.max_tokens = 61;
  const std::vector<Outcome> got = RunAll(sched, {r});
  EXPECT_TRUE(got[0].status.ok()) << got[0].status;
  EXPECT_EQ(got[0].tokens.size(), 61u);
}

TEST_F(ServingTest, SharedPromptPrefixIsComputedOnce) {
  auto m = Load(*model_);
  Engine& e = *m->engine;
  const std::vector<int32_t> prefix = Prompt(50, 9);
  GenerationRequest a, b;
  a.prompt = prefix;
  a.max_tokens = 4;
  b.prompt = prefix;
  b.prompt.insert(b.prompt.end(), {1, 2, 3});
  b.max_tokens = 4;
  const std::vector<int32_t> want_b = ManualGreedy(e, b.prompt, 4);
  Bound(e, 64);
  Scheduler sched(&e, SchedulerOptions{});
  ASSERT_TRUE(RunAll(sched, {a})[0].status.ok());
  const int64_t steps_tokens_a = sched.stats().step_tokens;
  const std::vector<Outcome> got = RunAll(sched, {b});
  EXPECT_EQ(got[0].tokens, want_b);
  const KvCacheStats s = e.kv_cache().stats();
  EXPECT_EQ(s.prefix_query_tokens, 50 + 53);
  EXPECT_EQ(s.prefix_hit_tokens, 48) << "b found a's three full blocks";
  // b computed only its 5 new prompt tokens and 3 decode tokens.
  EXPECT_EQ(sched.stats().step_tokens - steps_tokens_a, 53 - 48 + 3);
}

TEST_F(ServingTest, LimitsAreRefusedNotQueued) {
  auto m = Load(*model_);
  auto entered = std::make_shared<absl::Notification>();
  auto release = std::make_shared<absl::Notification>();
  Scheduler sched(
      m->engine.get(),
      SchedulerOptions{
          .max_running = 1, .max_waiting = 2, .max_prompt_tokens = 10, .max_score_tokens = 5});
  auto cb = [](const GenerationEvent&) {};
  GenerationRequest r;
  r.prompt = Prompt(11, 1);
  EXPECT_EQ(sched.Submit(r, cb).code(), absl::StatusCode::kResourceExhausted);
  r.prompt = Prompt(6, 1);
  r.score_only = true;
  EXPECT_EQ(sched.Submit(r, cb).code(), absl::StatusCode::kResourceExhausted);
  r.score_only = false;

  // One running request, held in its first callback; then two may wait and a third may not.
  r.max_tokens = 2;
  ASSERT_TRUE(sched
                  .Submit(r,
                          [entered, release](const GenerationEvent& ev) {
                            if (ev.done || entered->HasBeenNotified()) return;
                            entered->Notify();
                            release->WaitForNotification();
                          })
                  .ok());
  entered->WaitForNotification();
  EXPECT_TRUE(sched.Submit(r, cb).ok());
  EXPECT_TRUE(sched.Submit(r, cb).ok());
  EXPECT_EQ(sched.Submit(r, cb).code(), absl::StatusCode::kResourceExhausted);
  release->Notify();
}

TEST_F(ServingTest, ShortRequestsFirstTokenDoesNotWaitForAHugePrefill) {
  auto m = Load(*model_);
  GenerationRequest huge, small;
  huge.prompt = Prompt(1000, 2);
  huge.max_tokens = 1;
  small.prompt = Prompt(3, 4);
  small.max_tokens = 1;
  Scheduler sched(m->engine.get(), SchedulerOptions{.max_step_tokens = 16});
  std::vector<int> order;
  const std::vector<Outcome> got = RunAll(sched, {huge, small}, &order);
  ASSERT_TRUE(got[0].status.ok() && got[1].status.ok());
  ASSERT_EQ(order.size(), 2u);
  EXPECT_EQ(order[0], 1) << "the 3-token request's first token came after the 1000-token "
                            "prompt's: the prefill budget was not shared";
}

TEST_F(ServingTest, CancellationFreesBlocksAtTheNextStep) {
  auto m = Load(*model_);
  Bound(*m->engine, 64);
  absl::Notification done;
  Scheduler sched(m->engine.get(), SchedulerOptions{});
  GenerationRequest r;
  r.prompt = Prompt(40, 5);
  r.max_tokens = 900;  // fits: 40 + 899 tokens < 64 blocks of 16
  r.cancel = std::make_shared<CancelFlag>();
  // The request is cancelled from its own third token's callback, between steps: cancelled
  // from the test thread instead, it could run to its 900th token before a starved test
  // thread got to cancel it.
  int64_t used_while_running = -1;
  int64_t tokens_at_end = -1;
  ASSERT_TRUE(sched
                  .Submit(r,
                          [&](const GenerationEvent& ev) {
                            if (ev.done) {
                              EXPECT_EQ(ev.status.code(), absl::StatusCode::kCancelled);
                              tokens_at_end = ev.completion_tokens;
                              done.Notify();
                            } else if (ev.completion_tokens == 3) {
                              used_while_running = m->engine->kv_cache().stats().used_blocks;
                              r.cancel->Cancel();
                            }
                          })
                  .ok());
  ASSERT_TRUE(done.WaitForNotificationWithTimeout(absl::Seconds(30)));
  EXPECT_GT(used_while_running, 0);
  EXPECT_EQ(tokens_at_end, 3) << "the cancelled request kept generating";
  EXPECT_EQ(m->engine->kv_cache().stats().used_blocks, 0);
}

// When the last request of the batch leaves by cancellation no step follows, yet the observer
// (which feeds moemesh_running_sequences) must learn that the batch is empty.
TEST_F(ServingTest, ObserverSeesTheBatchEmptyWhenItsLastRequestIsCancelled) {
  auto m = Load(*model_);
  absl::Mutex mu;
  int last_running = -1;
  int64_t empty_reports = 0;
  SchedulerOptions o;
  o.on_step = [&](const StepInfo& s) {
    absl::MutexLock lock(&mu);
    last_running = s.running;
    if (s.sequences == 0) ++empty_reports;
  };
  absl::Notification done;
  Scheduler sched(m->engine.get(), o);
  GenerationRequest r;
  r.prompt = Prompt(8, 3);
  r.max_tokens = 100000;
  r.cancel = std::make_shared<CancelFlag>();
  ASSERT_TRUE(sched
                  .Submit(r,
                          [&](const GenerationEvent& ev) {
                            if (ev.done) {
                              done.Notify();
                            } else if (ev.completion_tokens == 2) {
                              // Between steps: the scheduler finds it at the top of its loop.
                              r.cancel->Cancel();
                            }
                          })
                  .ok());
  ASSERT_TRUE(done.WaitForNotificationWithTimeout(absl::Seconds(30)));
  absl::MutexLock lock(&mu);
  auto empty = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) { return last_running == 0; };
  EXPECT_TRUE(mu.AwaitWithTimeout(absl::Condition(&empty), absl::Seconds(10)));
  EXPECT_EQ(empty_reports, 1);
  EXPECT_EQ(sched.stats().running, 0);
}

TEST(ScoreOutputsTest, TopKAndTokenLogProbsMatchLogSoftmax) {
  // Two positions over a vocabulary of 4.
  Tensor logits = Tensor::FromVector({2, 4}, {1, 3, 3, 0, -1, 2, 0.5f, 2});
  const std::vector<int32_t> tokens = {0, 3};
  ScoreOptions o{.log_probs = true, .top_k = 2, .token_log_probs = true};
  auto out = ComputeScoreOutputs(logits, tokens, o);
  ASSERT_TRUE(out.ok()) << out.status();
  auto lse = [](std::vector<double> v) {
    double s = 0;
    for (double x : v) s += std::exp(x);
    return std::log(s);
  };
  const double l0 = lse({1, 3, 3, 0}), l1 = lse({-1, 2, 0.5, 2});
  ASSERT_EQ(out->top_ids.size(), 2u);
  EXPECT_EQ(out->top_ids[0], (std::vector<int32_t>{1, 2})) << "ties by lower id";
  EXPECT_EQ(out->top_ids[1], (std::vector<int32_t>{1, 3}));
  EXPECT_NEAR(out->top_log_probs[0][0], 3 - l0, 1e-6);
  EXPECT_NEAR(out->top_log_probs[1][1], 2 - l1, 1e-6);
  ASSERT_EQ(out->token_log_probs.size(), 1u);
  EXPECT_NEAR(out->token_log_probs[0], 0 - l0, 1e-6);  // P(tokens[1] = 3 | tokens[0])
  EXPECT_NEAR(out->logits.row(1)[0], -1 - l1, 1e-6);
  EXPECT_EQ(logits.row(1)[0], -1) << "the caller's tensor is not changed";
  o.omit_logits = true;
  out = ComputeScoreOutputs(logits, tokens, o);
  ASSERT_TRUE(out.ok());
  EXPECT_TRUE(out->logits.shape().empty());
  o.top_k = 5;
  EXPECT_EQ(ComputeScoreOutputs(logits, tokens, o).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace moemesh
