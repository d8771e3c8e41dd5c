// A failed step fails only what must fail: the scheduler retries a step that failed with a
// transient error (sequences advance only on success, so the retry is exact), fails a request
// whose own deadline passed while the others carry on, and fails everyone at once for an
// error that retrying cannot fix.
#include <atomic>
#include <map>
#include <thread>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "services/engine/inproc.h"
#include "services/engine/scheduler.h"
#include "tests/test_util.h"

namespace moemesh::testing {
namespace {

// The in-process MoE layer, failing the calls a script says to fail. The script is changed
// from the test thread while the scheduler's thread calls Forward, so it is read and written
// under one lock: a call sees the old script or the new one, never a mix of the two (such as
// the old range with the new OK status, which would "fail" a call with an OK status).
class FlakyMoe final : public MoeLayer {
 public:
  explicit FlakyMoe(MoeLayer* inner) : inner_(inner) {}
  absl::StatusOr<Tensor> Forward(int layer, const Tensor& hidden,
                                 const CallOptions& opts) override {
    const int n = calls_.fetch_add(1);
    {
      absl::MutexLock lock(&mu_);
      if (n >= fail_from_ && n < fail_until_) return status_;
    }
    return inner_->Forward(layer, hidden, opts);
  }
  // Calls [from, until) fail with `status`.
  void FailCalls(int from, int until, absl::Status status) {
    absl::MutexLock lock(&mu_);
    status_ = std::move(status);
    fail_from_ = from;
    fail_until_ = until;
  }
  int calls() const { return calls_.load(); }

 private:
  MoeLayer* inner_;
  std::atomic<int> calls_{0};
  absl::Mutex mu_;
  int fail_from_ ABSL_GUARDED_BY(mu_) = 0;
  int fail_until_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Status status_ ABSL_GUARDED_BY(mu_);
};

class StepRetryTest : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ = MakeSmallModel(dir_);
    auto m = InprocModel::Load(path_);
    ASSERT_TRUE(m.ok()) << m.status();
    model_ = *std::move(m);
    flaky_ = std::make_unique<FlakyMoe>(model_->moe.get());
    auto e = Engine::Load(*model_->checkpoint, model_->config, model_->backend.get(), flaky_.get());
    ASSERT_TRUE(e.ok()) << e.status();
    engine_ = *std::move(e);
  }

  struct Result {
    std::vector<int32_t> tokens;
    absl::Status status;
    std::string finish;
  };

  // Runs the requests together; returns each one's tokens and end.
  std::vector<Result> Run(const std::vector<GenerationRequest>& reqs) {
    Scheduler sched(engine_.get(), SchedulerOptions{});
    std::vector<Result> out(reqs.size());
    std::vector<absl::Notification> done(reqs.size());
    for (size_t i = 0; i < reqs.size(); ++i) {
      absl::Status s = sched.Submit(reqs[i], [&, i](const GenerationEvent& ev) {
        if (!ev.done) {
          out[i].tokens.push_back(ev.token);
          return;
        }
        out[i].status = ev.status;
        out[i].finish = ev.finish_reason;
        done[i].Notify();
      });
      EXPECT_TRUE(s.ok()) << s;
    }
    for (auto& d : done) d.WaitForNotification();
    return out;
  }

  static GenerationRequest Req(int salt, int max_tokens = 8) {
    GenerationRequest r;
    for (int i = 0; i < 5; ++i) r.prompt.push_back((i * 7 + salt * 13 + 1) % 90);
    r.max_tokens = max_tokens;
    return r;
  }

  TempDir dir_;
  std::string path_;
  std::unique_ptr<InprocModel> model_;
  std::unique_ptr<FlakyMoe> flaky_;
  std::unique_ptr<Engine> engine_;
};

TEST_F(StepRetryTest, TransientFailuresAreRetriedAndChangeNoToken) {
  const std::vector<GenerationRequest> reqs = {Req(1), Req(2), Req(3)};
  const std::vector<Result> clean = Run(reqs);
  for (const Result& r : clean) ASSERT_TRUE(r.status.ok()) << r.status;
  // Fail a few MoE calls in the middle of the decode: each failed step is retried.
  const int base = flaky_->calls();
  flaky_->FailCalls(base + 5, base + 8, absl::UnavailableError("router went away"));
  const std::vector<Result> flaky = Run(reqs);
  for (size_t i = 0; i < reqs.size(); ++i) {
    EXPECT_TRUE(flaky[i].status.ok()) << flaky[i].status;
    EXPECT_EQ(flaky[i].tokens, clean[i].tokens) << "request " << i;
    EXPECT_EQ(flaky[i].finish, "length");
  }
}

TEST_F(StepRetryTest, OnlyTheRequestWhoseDeadlinePassedFails) {
  std::vector<GenerationRequest> reqs = {Req(1, 6), Req(2, 6)};
  const std::vector<Result> clean = Run(reqs);
  // The MoE layer fails for a while (every call during the next 0.6 s); the first request's
  // deadline passes meanwhile, the second's does not.
  const int base = flaky_->calls();
  flaky_->FailCalls(base + 2, base + 1000000, absl::UnavailableError("no replica"));
  reqs[0].deadline = absl::Now() + absl::Milliseconds(300);
  reqs[1].deadline = absl::Now() + absl::Seconds(60);
  std::thread heal([&] {
    absl::SleepFor(absl::Milliseconds(600));
    flaky_->FailCalls(0, 0, absl::OkStatus());
  });
  SchedulerOptions o;
  o.max_failed_steps = 1000;  // only the deadline may end it
  Scheduler sched(engine_.get(), o);
  std::vector<Result> out(2);
  std::vector<absl::Notification> done(2);
  for (size_t i = 0; i < 2; ++i) {
    ASSERT_TRUE(sched
                    .Submit(reqs[i],
                            [&, i](const GenerationEvent& ev) {
                              if (!ev.done) return out[i].tokens.push_back(ev.token);
                              out[i].status = ev.status;
                              done[i].Notify();
                            })
                    .ok());
  }
  for (auto& d : done) d.WaitForNotification();
  heal.join();
  EXPECT_EQ(out[0].status.code(), absl::StatusCode::kDeadlineExceeded) << out[0].status;
  EXPECT_TRUE(out[1].status.ok()) << out[1].status;
  EXPECT_EQ(out[1].tokens, clean[1].tokens);
}

TEST_F(StepRetryTest, PermanentErrorsAndTooManyFailuresFailTheStepsRequests) {
  const int base = flaky_->calls();
  flaky_->FailCalls(base + 1, base + 1000000, absl::InvalidArgumentError("bad expert"));
  const std::vector<Result> bad = Run({Req(1), Req(2)});
  for (const Result& r : bad) EXPECT_EQ(r.status.code(), absl::StatusCode::kInvalidArgument);
  flaky_->FailCalls(0, 1000000, absl::UnavailableError("gone for good"));
  const std::vector<Result> gone = Run({Req(3)});
  EXPECT_EQ(gone[0].status.code(), absl::StatusCode::kUnavailable);
  EXPECT_TRUE(gone[0].tokens.empty());
}

}  // namespace
}  // namespace moemesh::testing
