// Micro-batch pipelining in the engine (issue 12): a step split into 1, 2 or 3 micro-batches
// gives bitwise the same logits, for batches of decode tokens and prefill chunks (a single
// prompt stays one micro-batch), for Mixtral and
// DeepSeek (MLA, dense first layer, shared experts) models. With an MoE layer that answers
// later on another thread, as the router client does, two calls are in flight at once: the
// second micro-batch's attention runs while the first one's MoE call is out.
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "services/engine/inproc.h"
#include "services/engine/scheduler.h"
#include "services/moe/shared_experts_layer.h"
#include "tests/test_util.h"

namespace moemesh {
namespace {

using ::moemesh::testing::TempDir;

bool Same(const Tensor& a, const Tensor& b) {
  return a.numel() == b.numel() && std::memcmp(a.data(), b.data(), a.numel() * 4) == 0;
}

// Answers StartForward from a thread of its own, like a network call, after `per_call` +
// `per_row` · rows; with `serial`, one call at a time (splitting a step then doubles the MoE
// time), otherwise calls overlap. Counts how many calls were in flight at once. Until two calls
// have been in flight together, a call waits (up to `pair_timeout`, none by default) for a second
// one to start before it answers: whether the engine overlaps its micro-batches must not depend
// on how fast this machine runs the other micro-batch's attention. An engine that serialises
// them waits out the timeout once and is seen.
struct LateMoeOptions {
  absl::Duration per_call = absl::ZeroDuration();
  absl::Duration per_row = absl::ZeroDuration();
  bool serial = false;
  absl::Duration pair_timeout = absl::ZeroDuration();
};

class LateMoe final : public MoeLayer {
 public:
  LateMoe(MoeLayer* inner, LateMoeOptions o) : inner_(inner), o_(o) {}
  ~LateMoe() override {
    for (auto& t : threads_) t.join();
  }
  absl::StatusOr<Tensor> Forward(int layer, const Tensor& hidden,
                                 const CallOptions& opts) override {
    return inner_->Forward(layer, hidden, opts);
  }
  void StartForward(int layer, Tensor hidden, const CallOptions& opts, MoeDone done) override {
    {
      absl::MutexLock lock(&mu_);
      max_in_flight_ = std::max(max_in_flight_, ++in_flight_);
    }
    absl::MutexLock lock(&threads_mu_);
    threads_.emplace_back([this, layer, hidden, opts, done = std::move(done)] {
      {
        absl::MutexLock lock(&mu_);
        const auto paired = +[](int* m) { return *m >= 2; };
        if (!gave_up_) {
          gave_up_ =
              !mu_.AwaitWithTimeout(absl::Condition(paired, &max_in_flight_), o_.pair_timeout);
        }
      }
      absl::StatusOr<Tensor> r;
      {
        std::unique_ptr<absl::MutexLock> one_at_a_time;
        if (o_.serial) one_at_a_time = std::make_unique<absl::MutexLock>(&serial_mu_);
        absl::SleepFor(o_.per_call + o_.per_row * hidden.dim(0));
        r = inner_->Forward(layer, hidden, opts);
      }
      {
        absl::MutexLock lock(&mu_);
        --in_flight_;
      }
      done(std::move(r));
    });
  }
  int max_in_flight() {
    absl::MutexLock lock(&mu_);
    return max_in_flight_;
  }

 private:
  MoeLayer* inner_;
  const LateMoeOptions o_;
  absl::Mutex mu_;
  int in_flight_ = 0, max_in_flight_ = 0;
  bool gave_up_ = false;  // a wait timed out: the engine did not overlap; stop waiting
  absl::Mutex serial_mu_;
  absl::Mutex threads_mu_;
  std::vector<std::thread> threads_;
};

struct Case {
  bool deepseek;
  int groups;
};

class MicroBatchTest : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override {
    GeneratorOptions o;
    o.config = GetParam().deepseek ? SmallDeepseekConfig(/*vocab=*/128, /*hidden=*/80)
                                   : SmallMixtralConfig(128, 72, 100, 3);
    o.seed = 5;
    path_ = moemesh::testing::MakeModel(dir_, "m", o);
    InprocOptions io;
    io.groups = GetParam().groups;
    auto m = InprocModel::Load(path_, io);
    ASSERT_TRUE(m.ok()) << m.status();
    model_ = *std::move(m);
  }

  // Three steps over five sequences: a mixed prefill step (one long prompt, short ones, one
  // with every position's logits), then two decode steps. Returns every logits tensor.
  std::vector<Tensor> Run(Engine& e) {
    std::vector<Tensor> all;
    std::mt19937 rng(17);
    const int vocab = e.config().vocab_size;
    auto tokens = [&](int n) {
      std::vector<int32_t> t(n);
      for (int32_t& x : t) x = static_cast<int32_t>(rng() % vocab);
      return t;
    };
    std::vector<std::unique_ptr<Sequence>> seqs;
    std::vector<std::vector<int32_t>> feed = {tokens(41), tokens(3), tokens(1), tokens(9),
                                              tokens(6)};
    for (size_t i = 0; i < feed.size(); ++i) seqs.push_back(e.NewSequence());
    for (int step = 0; step < 3; ++step) {
      std::vector<StepInput> in;
      for (size_t i = 0; i < seqs.size(); ++i) in.push_back({seqs[i].get(), feed[i], i == 3});
      auto r = e.Step(in);
      EXPECT_TRUE(r.ok()) << r.status();
      if (!r.ok()) return all;
      for (Tensor& t : *r) all.push_back(t);
      for (auto& f : feed) f = tokens(1);
    }
    // One prompt alone, every position's logits: with B micro-batches it is cut into B parts,
    // the later ones attending to keys the earlier ones wrote in the same layer.
    auto solo = e.NewSequence();
    const std::vector<int32_t> p = tokens(33);
    StepInput in{solo.get(), p, true};
    auto r = e.Step({&in, 1});
    EXPECT_TRUE(r.ok()) << r.status();
    if (r.ok()) all.push_back((*r)[0]);
    return all;
  }

  TempDir dir_;
  std::string path_;
  std::unique_ptr<InprocModel> model_;
};

TEST_P(MicroBatchTest, LogitsAreBitwiseEqualForOneTwoAndThreeMicroBatches) {
  Engine& e = *model_->engine;
  const std::vector<Tensor> one = Run(e);
  ASSERT_FALSE(one.empty());
  for (int b : {2, 3}) {
    ASSERT_TRUE(e.set_micro_batches(b).ok());
    const std::vector<Tensor> got = Run(e);
    ASSERT_EQ(got.size(), one.size());
    for (size_t i = 0; i < one.size(); ++i) {
      EXPECT_TRUE(Same(got[i], one[i])) << b << " micro-batches, logits " << i;
    }
  }
  EXPECT_FALSE(e.set_micro_batches(0).ok());
  EXPECT_FALSE(e.set_micro_batches(9).ok());
}

TEST_P(MicroBatchTest, TwoCallsAreInFlightAtOnceAndTheLogitsDoNotChange) {
  const std::vector<Tensor> one = Run(*model_->engine);
  // The same dense weights over an MoE layer that answers late from another thread.
  LateMoe delayed(model_->moe.get(),
                  {.per_call = absl::Milliseconds(2), .pair_timeout = absl::Seconds(10)});
  auto e = Engine::Load(*model_->checkpoint, model_->config, model_->backend.get(), &delayed);
  ASSERT_TRUE(e.ok()) << e.status();
  ASSERT_TRUE((*e)->set_micro_batches(2).ok());
  const std::vector<Tensor> got = Run(**e);
  ASSERT_EQ(got.size(), one.size());
  for (size_t i = 0; i < one.size(); ++i) EXPECT_TRUE(Same(got[i], one[i])) << "logits " << i;
  EXPECT_EQ(delayed.max_in_flight(), 2);
  const StepProfile prof = (*e)->profile();
  EXPECT_EQ(prof.steps, 4);
  EXPECT_GT(prof.moe_wait_s, 0);
  EXPECT_LE(prof.moe_wait_s, prof.wall_s);
}

// Decode steps of six sequences with the adaptive policy over `moe`: the logits equal a plain
// engine's, bitwise, whichever way each step ran. Returns {steps run whole, steps split}.
std::pair<int64_t, int64_t> RunAdaptive(InprocModel& m, MoeLayer* moe) {
  auto e = Engine::Load(*m.checkpoint, m.config, m.backend.get(), moe);
  EXPECT_TRUE(e.ok()) << e.status();
  if (!e.ok()) return {0, 0};
  EXPECT_TRUE((*e)->set_micro_batches(2).ok());
  (*e)->set_micro_batch_policy(MicroBatchPolicy::kAdaptive);
  Engine& plain = *m.engine;
  EXPECT_TRUE(plain.set_micro_batches(1).ok());
  std::vector<std::unique_ptr<Sequence>> a, b;
  std::vector<std::vector<int32_t>> feed;
  for (int i = 0; i < 6; ++i) {
    a.push_back((*e)->NewSequence());
    b.push_back(plain.NewSequence());
    feed.push_back({static_cast<int32_t>(3 + i), static_cast<int32_t>(40 + i)});
  }
  for (int step = 0; step < 40; ++step) {
    std::vector<StepInput> ia, ib;
    for (int i = 0; i < 6; ++i) {
      ia.push_back({a[i].get(), feed[i], false});
      ib.push_back({b[i].get(), feed[i], false});
    }
    auto ra = (*e)->Step(ia);
    auto rb = plain.Step(ib);
    EXPECT_TRUE(ra.ok() && rb.ok());
    if (!ra.ok() || !rb.ok()) return {0, 0};
    for (int i = 0; i < 6; ++i) {
      EXPECT_TRUE(Same((*ra)[i], (*rb)[i])) << "step " << step << ", sequence " << i;
      feed[i] = {static_cast<int32_t>((step * 7 + i * 13) % 128)};
    }
  }
  // The profile counts the same choices by kind: the first step's two-token inputs are a
  // prefill step, the other 39 decode steps.
  const StepProfile p = (*e)->profile();
  const auto counts = (*e)->adaptive_split_counts();
  EXPECT_EQ(p.by_parts[1][1] + p.by_parts[1][2], 1);
  EXPECT_EQ(p.by_parts[0][1] + p.by_parts[0][2], 39);
  EXPECT_EQ(p.by_parts[0][1] + p.by_parts[1][1], counts.first);
  EXPECT_EQ(p.by_parts[0][2] + p.by_parts[1][2], counts.second);
  return counts;
}

TEST_P(MicroBatchTest, AdaptivePolicyRunsStepsWholeWhenSplittingCosts) {
  // Calls one at a time, each with a fixed cost: two calls per layer take twice as long.
  LateMoe moe(model_->moe.get(), {.per_call = absl::Milliseconds(8), .serial = true});
  const auto [whole, split] = RunAdaptive(*model_, &moe);
  EXPECT_EQ(whole + split, 40);
  // Three tries each, then the faster one, and every 16th step of the bucket the other (35 and
  // 5 when every measurement is clean; the margin allows for a stalled step on a loaded machine).
  EXPECT_GE(whole, 2 * split) << whole << " whole, " << split << " split";
}

TEST_P(MicroBatchTest, AdaptivePolicySplitsStepsWhenSplittingPays) {
  // Calls overlap and cost per row: two half-size calls in flight at once take half as long.
  LateMoe moe(model_->moe.get(), {.per_row = absl::Milliseconds(2)});
  const auto [whole, split] = RunAdaptive(*model_, &moe);
  EXPECT_EQ(whole + split, 40);
  EXPECT_GE(split, 2 * whole) << whole << " whole, " << split << " split";
}

TEST_P(MicroBatchTest, SchedulerGreedyTokensAreTheSameWithTwoMicroBatches) {
  auto generate = [&](int micro) {
    EXPECT_TRUE(model_->engine->set_micro_batches(micro).ok());
    Scheduler sched(model_->engine.get(), SchedulerOptions{.max_step_tokens = 24});
    absl::Mutex mu;
    std::vector<std::vector<int32_t>> out(6);
    int finished = 0;
    for (int i = 0; i < 6; ++i) {
      GenerationRequest req;
      for (int k = 0; k < 5 + 7 * i; ++k) req.prompt.push_back((k * 31 + i * 7) % 128);
      req.max_tokens = 6;
      EXPECT_TRUE(sched
                      .Submit(std::move(req),
                              [&, i](const GenerationEvent& ev) {
                                absl::MutexLock lock(&mu);
                                if (ev.done) {
                                  ++finished;
                                } else {
                                  out[i].push_back(ev.token);
                                }
                              })
                      .ok());
    }
    absl::MutexLock lock(&mu);
    mu.Await(absl::Condition(
        +[](int* f) { return *f == 6; }, &finished));
    return out;
  };
  const auto one = generate(1);
  const auto two = generate(2);
  EXPECT_EQ(one, two);
  for (const auto& t : one) EXPECT_EQ(t.size(), 6u);
}

INSTANTIATE_TEST_SUITE_P(All, MicroBatchTest,
                         ::testing::Values(Case{false, 1}, Case{false, 2}, Case{true, 2}),
                         [](const auto& info) {
                           return std::string(info.param.deepseek ? "DeepSeek_" : "Mixtral_") +
                                  std::to_string(info.param.groups) + "groups";
                         });

// The gateway's placement of DeepSeek's shared experts: SharedExpertsLayer's asynchronous
// form adds the same shared output whichever half answers first.
TEST(SharedExpertsLayerTest, StartForwardEqualsForward) {
  TempDir dir;
  GeneratorOptions o;
  o.config = SmallDeepseekConfig(128, 80);
  o.seed = 9;
  const std::string path = moemesh::testing::MakeModel(dir, "m", o);
  InprocOptions io;
  io.groups = 2;
  auto m = InprocModel::Load(path, io);
  ASSERT_TRUE(m.ok()) << m.status();
  std::vector<ExpertKey> keys;
  for (int layer : (*m)->config.MoeLayers()) keys.push_back({layer, kSharedExpertId});
  auto group = LocalExpertGroup::Load(*(*m)->checkpoint, (*m)->config, keys, (*m)->backend.get());
  ASSERT_TRUE(group.ok()) << group.status();
  // Sync and async forms of the same layer, the routed half answering late from a thread.
  LateMoe delayed((*m)->moe.get(), {.per_call = absl::Milliseconds(1)});
  SharedExpertsLayer layer(&delayed, *std::move(group));
  const int l = (*m)->config.MoeLayers().front();
  Tensor h = Tensor::FromVector({5, 80}, moemesh::testing::RandomFloats(5 * 80, 3));
  auto sync = layer.Forward(l, h, {});
  ASSERT_TRUE(sync.ok()) << sync.status();
  absl::Notification done;
  absl::StatusOr<Tensor> async;
  layer.StartForward(l, h, {}, [&](absl::StatusOr<Tensor> r) {
    async = std::move(r);
    done.Notify();
  });
  done.WaitForNotification();
  ASSERT_TRUE(async.ok()) << async.status();
  EXPECT_TRUE(Same(*sync, *async));
}

}  // namespace
}  // namespace moemesh
