// LocalExpertGroup and MoeDispatcher on a generated Mixtral checkpoint, against a naive
// per-token loop written here (weights read straight from the checkpoint, math in double).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <future>
#include <memory>
#include <mutex>
#include <numeric>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "services/compute/backend.h"
#include "services/engine/inproc.h"
#include "services/model/config.h"
#include "services/model/generator.h"
#include "services/model/safetensors.h"
#include "services/moe/gating.h"
#include "services/moe/local_expert_group.h"
#include "services/moe/moe_layer.h"
#include "tests/test_util.h"

namespace moemesh {
namespace {

using ::moemesh::testing::MaxAbsDiff;
using ::moemesh::testing::RandomFloats;
using ::moemesh::testing::TempDir;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

std::string Msg(const absl::Status& s) { return std::string(s.message()); }

class MoeTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir();
    model_ = new std::string(moemesh::testing::MakeSmallModel(*dir_));
  }
  static void TearDownTestSuite() {
    delete model_;
    delete dir_;
  }

  void SetUp() override {
    auto cfg = LoadModelConfig(*model_);
    ASSERT_TRUE(cfg.ok()) << cfg.status();
    cfg_ = *cfg;
    auto ckpt = Checkpoint::Open(*model_);
    ASSERT_TRUE(ckpt.ok()) << ckpt.status();
    ckpt_ = std::move(*ckpt);
    // The generated config is what SmallMixtralConfig() says.
    ASSERT_EQ(cfg_.num_experts, 8);
    ASSERT_EQ(cfg_.top_k, 2);
    ASSERT_EQ(cfg_.num_layers, 2);
    ASSERT_EQ(cfg_.hidden_size, 32);
  }

  std::vector<ExpertKey> AllExperts() const {
    std::vector<ExpertKey> keys;
    for (int l = 0; l < cfg_.num_layers; ++l)
      for (int e = 0; e < cfg_.num_experts; ++e) keys.push_back({l, e});
    return keys;
  }

  std::vector<double> Load(const std::string& name) const {
    auto t = ckpt_->LoadF32(name);
    EXPECT_TRUE(t.ok()) << t.status();
    if (!t.ok()) return {};
    return std::vector<double>(t->span().begin(), t->span().end());
  }

  // w2 · (silu(w1 x) * (w3 x)) for one token, from the definition.
  std::vector<double> NaiveExpert(int layer, int expert, const float* x) const {
    const ExpertTensorNames n = RoutedExpertNames(cfg_, layer, expert);
    const std::vector<double> w1 = Load(n.gate), w3 = Load(n.up), w2 = Load(n.down);
    const int64_t h = cfg_.hidden_size, inter = cfg_.moe_intermediate_size;
    std::vector<double> a(inter), y(h, 0.0);
    for (int64_t i = 0; i < inter; ++i) {
      double g = 0, u = 0;
      for (int64_t j = 0; j < h; ++j) {
        g += w1[i * h + j] * x[j];
        u += w3[i * h + j] * x[j];
      }
      a[i] = g / (1.0 + std::exp(-g)) * u;
    }
    for (int64_t j = 0; j < h; ++j)
      for (int64_t i = 0; i < inter; ++i) y[j] += w2[j * inter + i] * a[i];
    return y;
  }

  // The whole Mixtral MoE block for T tokens: softmax over the gate logits, top-k,
  // renormalised, weighted sum of the chosen experts.
  std::vector<float> NaiveMoe(int layer, const std::vector<float>& x, int64_t t) const {
    const int64_t h = cfg_.hidden_size, ne = cfg_.num_experts;
    const std::vector<double> gate = Load(GateWeightName(cfg_, layer));
    std::vector<float> out(t * h, 0.0f);
    for (int64_t i = 0; i < t; ++i) {
      const float* xi = x.data() + i * h;
      std::vector<double> p(ne);
      for (int64_t e = 0; e < ne; ++e) {
        p[e] = 0;
        for (int64_t j = 0; j < h; ++j) p[e] += gate[e * h + j] * xi[j];
      }
      const double mx = *std::max_element(p.begin(), p.end());
      double z = 0;
      for (double& v : p) z += (v = std::exp(v - mx));
      for (double& v : p) v /= z;
      std::vector<int> order(ne);
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return p[a] > p[b]; });
      double chosen = 0;
      for (int k = 0; k < cfg_.top_k; ++k) chosen += p[order[k]];
      std::vector<double> acc(h, 0.0);
      for (int k = 0; k < cfg_.top_k; ++k) {
        const std::vector<double> y = NaiveExpert(layer, order[k], xi);
        for (int64_t j = 0; j < h; ++j) acc[j] += p[order[k]] / chosen * y[j];
      }
      for (int64_t j = 0; j < h; ++j) out[i * h + j] = static_cast<float>(acc[j]);
    }
    return out;
  }

  absl::StatusOr<std::unique_ptr<MoeDispatcher>> MakeDispatcher(
      const std::vector<std::vector<ExpertKey>>& placement) {
    std::vector<MoeDispatcher::GroupEntry> groups;
    for (size_t g = 0; g < placement.size(); ++g) {
      auto group =
          LocalExpertGroup::Load(*ckpt_, cfg_, placement[g], backend_.get(), absl::StrCat("g", g));
      if (!group.ok()) return group.status();
      groups.push_back({std::shared_ptr<ExpertGroup>(std::move(*group)), placement[g]});
    }
    auto gates = MoeDispatcher::LoadGates(*ckpt_, cfg_);
    if (!gates.ok()) return gates.status();
    return MoeDispatcher::Create(cfg_, std::move(*gates), std::move(groups), backend_.get());
  }

  static TempDir* dir_;
  static std::string* model_;
  ModelConfig cfg_;
  std::unique_ptr<Checkpoint> ckpt_;
  std::unique_ptr<ComputeBackend> backend_ = MakeCpuBackend();
};

TempDir* MoeTest::dir_ = nullptr;
std::string* MoeTest::model_ = nullptr;

// A batch for `layer` of tokens from `x` with per-token expert lists.
ExpertBatch MakeBatch(int layer, const std::vector<float>& x, int64_t hidden,
                      const std::vector<std::vector<ExpertAssignment>>& per_token) {
  ExpertBatch b;
  b.layer = layer;
  const int64_t n = static_cast<int64_t>(per_token.size());
  b.tokens = Tensor::FromVector({n, hidden}, std::vector<float>(x.begin(), x.begin() + n * hidden));
  b.offsets = {0};
  for (const auto& as : per_token) {
    for (const ExpertAssignment& a : as) b.assignments.push_back(a);
    b.offsets.push_back(static_cast<int32_t>(b.assignments.size()));
  }
  return b;
}

// ---- LocalExpertGroup ---------------------------------------------------------------------

TEST_F(MoeTest, LocalExpertGroupMatchesNaiveLoop) {
  auto group = LocalExpertGroup::Load(*ckpt_, cfg_, AllExperts(), backend_.get(), "all");
  ASSERT_TRUE(group.ok()) << group.status();
  EXPECT_EQ((*group)->name(), "all");
  EXPECT_EQ((*group)->hidden(), 32);
  EXPECT_EQ((*group)->weight_bytes(), int64_t{16} * 3 * 48 * 32 * 4);
  const int64_t h = cfg_.hidden_size;
  const std::vector<float> x = RandomFloats(6 * h, 1);
  // Tokens with 2, 1, 0, 3 and 2 experts; expert 4 is shared by three tokens.
  const std::vector<std::vector<ExpertAssignment>> per_token = {
      {{4, 0.7f}, {1, 0.3f}},  {{4, 1.0f}}, {}, {{0, 0.2f}, {7, 0.5f}, {4, 0.3f}},
      {{6, -1.5f}, {2, 2.0f}}, {{3, 0.0f}}};
  for (int layer : {0, 1}) {
    const ExpertBatch b = MakeBatch(layer, x, h, per_token);
    absl::StatusOr<Tensor> out = (*group)->Run(b);
    ASSERT_TRUE(out.ok()) << out.status();
    ASSERT_THAT(out->shape(), ElementsAre(6, h));
    for (size_t i = 0; i < per_token.size(); ++i) {
      std::vector<double> expect(h, 0.0);
      for (const ExpertAssignment& a : per_token[i]) {
        const std::vector<double> y = NaiveExpert(layer, a.expert, x.data() + i * h);
        for (int64_t j = 0; j < h; ++j) expect[j] += a.weight * y[j];
      }
      for (int64_t j = 0; j < h; ++j) {
        ASSERT_NEAR(out->row(i)[j], expect[j], 1e-5) << "layer " << layer << " token " << i;
      }
    }
    // The token without experts gets zeros; a zero weight contributes nothing.
    for (int64_t j = 0; j < h; ++j) EXPECT_EQ(out->row(2)[j], 0.0f);
    for (int64_t j = 0; j < h; ++j) EXPECT_EQ(out->row(5)[j], 0.0f);
    // Each call runs experts 0, 1, 2, 3, 4, 6 and 7 once (expert 4 for three tokens), reading
    // each one's three matrices once.
    const LocalExpertGroup::RunCounters c = (*group)->counters();
    EXPECT_EQ(c.expert_runs, 7 * (layer + 1));
    EXPECT_EQ(c.weight_bytes_read, 7 * (layer + 1) * int64_t{3} * 48 * 32 * 4);
  }
  // A refused call counts nothing: a group holding experts 0 and 1 of layer 0, asked for 1 and
  // then 5, answers NOT_FOUND having run neither.
  auto part = LocalExpertGroup::Load(*ckpt_, cfg_, {{0, 0}, {0, 1}}, backend_.get(), "part");
  ASSERT_TRUE(part.ok()) << part.status();
  const absl::StatusOr<Tensor> refused =
      (*part)->Run(MakeBatch(0, x, h, {{{1, 1.0f}}, {{5, 1.0f}}, {}, {}, {}, {}}));
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ((*part)->counters().expert_runs, 0);
  EXPECT_EQ((*part)->counters().weight_bytes_read, 0);
  ASSERT_TRUE((*part)->Run(MakeBatch(0, x, h, {{{1, 1.0f}}, {{0, 1.0f}}, {}, {}, {}, {}})).ok());
  EXPECT_EQ((*part)->counters().expert_runs, 2);
}

TEST_F(MoeTest, ResultDoesNotDependOnBatchComposition) {
  auto group = LocalExpertGroup::Load(*ckpt_, cfg_, AllExperts(), backend_.get());
  ASSERT_TRUE(group.ok()) << group.status();
  const int64_t h = cfg_.hidden_size;
  const std::vector<float> x = RandomFloats(3 * h, 2);
  const std::vector<std::vector<ExpertAssignment>> all = {
      {{1, 0.6f}, {5, 0.4f}}, {{5, 1.0f}}, {{1, 0.5f}, {2, 0.5f}}};
  auto together = (*group)->Run(MakeBatch(1, x, h, all));
  ASSERT_TRUE(together.ok()) << together.status();
  for (size_t i = 0; i < all.size(); ++i) {
    std::vector<float> xi(x.begin() + i * h, x.begin() + (i + 1) * h);
    auto alone = (*group)->Run(MakeBatch(1, xi, h, {all[i]}));
    ASSERT_TRUE(alone.ok()) << alone.status();
    EXPECT_LE(MaxAbsDiff(alone->data(), together->row(i), h), 1e-6) << "token " << i;
  }
}

TEST_F(MoeTest, AsyncFormAnswersOnceAndHonoursCancel) {
  auto group = LocalExpertGroup::Load(*ckpt_, cfg_, AllExperts(), backend_.get());
  ASSERT_TRUE(group.ok()) << group.status();
  const int64_t h = cfg_.hidden_size;
  auto b = std::make_shared<ExpertBatch>(MakeBatch(0, RandomFloats(h, 3), h, {{{2, 1.0f}}}));
  int calls = 0;
  absl::StatusOr<Tensor> got;
  (*group)->RunExpertsAsync(b, CallOptions{}, [&](absl::StatusOr<Tensor> r) {
    ++calls;
    got = std::move(r);
  });
  EXPECT_EQ(calls, 1);
  ASSERT_TRUE(got.ok()) << got.status();
  auto sync = (*group)->Run(*b);
  ASSERT_TRUE(sync.ok());
  EXPECT_EQ(MaxAbsDiff(got->data(), sync->data(), h), 0.0);

  CallOptions cancelled;
  cancelled.cancel = std::make_shared<CancelFlag>();
  cancelled.cancel->Cancel();
  calls = 0;
  (*group)->RunExpertsAsync(b, cancelled, [&](absl::StatusOr<Tensor> r) {
    ++calls;
    got = std::move(r);
  });
  EXPECT_EQ(calls, 1);
  EXPECT_EQ(got.status().code(), absl::StatusCode::kCancelled);
}

TEST_F(MoeTest, ExpertNotHeldIsNotFound) {
  std::vector<ExpertKey> some = {{0, 0}, {0, 1}, {0, 2}, {0, 3}, {1, 5}};
  auto group = LocalExpertGroup::Load(*ckpt_, cfg_, some, backend_.get(), "half");
  ASSERT_TRUE(group.ok()) << group.status();
  EXPECT_TRUE((*group)->Holds({0, 3}));
  EXPECT_FALSE((*group)->Holds({0, 5}));
  EXPECT_TRUE((*group)->Holds({1, 5}));
  EXPECT_EQ((*group)->weight_bytes(), int64_t{5} * 3 * 48 * 32 * 4);
  const int64_t h = cfg_.hidden_size;
  const std::vector<float> x = RandomFloats(2 * h, 4);
  absl::StatusOr<Tensor> out = (*group)->Run(MakeBatch(0, x, h, {{{1, 0.5f}}, {{5, 0.5f}}}));
  ASSERT_FALSE(out.ok());
  EXPECT_EQ(out.status().code(), absl::StatusCode::kNotFound) << out.status();
  EXPECT_THAT(Msg(out.status()), HasSubstr("layer 0"));
  EXPECT_THAT(Msg(out.status()), HasSubstr("expert 5"));
  EXPECT_THAT(Msg(out.status()), HasSubstr("half"));
  // Expert 5 is held at layer 1 only.
  EXPECT_TRUE((*group)->Run(MakeBatch(1, x, h, {{{5, 0.5f}}})).ok());
  EXPECT_FALSE((*group)->Run(MakeBatch(1, x, h, {{{0, 0.5f}}})).ok());
}

TEST_F(MoeTest, MalformedBatchesAreInvalidArgument) {
  auto group = LocalExpertGroup::Load(*ckpt_, cfg_, AllExperts(), backend_.get());
  ASSERT_TRUE(group.ok()) << group.status();
  const int64_t h = cfg_.hidden_size;
  const std::vector<float> x = RandomFloats(3 * h + 3, 5);
  const ExpertBatch good = MakeBatch(0, x, h, {{{1, 0.5f}}, {{2, 0.5f}, {3, 0.5f}}});
  ASSERT_TRUE((*group)->Run(good).ok());
  {
    // The same tokens named as rows 2 and 0 of a wider tensor give the same result, bitwise.
    ExpertBatch named = good;
    named.tokens = Tensor::FromVector({3, h}, std::vector<float>(x.begin() + 3, x.end()));
    std::memcpy(named.tokens.mutable_row(2), good.tokens.row(0), h * sizeof(float));
    std::memcpy(named.tokens.mutable_row(0), good.tokens.row(1), h * sizeof(float));
    named.rows = {2, 0};
    absl::StatusOr<Tensor> a = (*group)->Run(good);
    absl::StatusOr<Tensor> b = (*group)->Run(named);
    ASSERT_TRUE(a.ok() && b.ok()) << b.status();
    ASSERT_EQ(a->shape(), b->shape());
    EXPECT_EQ(std::memcmp(a->data(), b->data(), a->numel() * sizeof(float)), 0);
  }

  std::vector<std::pair<std::string, ExpertBatch>> bad;
  for (std::vector<int32_t> rows : {std::vector<int32_t>{0, 2}, {-1, 0}, {0}, {1, 0, 1}}) {
    ExpertBatch b = good;  // rows [0, 2) exist; one named row per offset interval
    b.rows = rows;
    bad.push_back({absl::StrCat("rows ", absl::StrJoin(rows, ",")), b});
  }
  {
    ExpertBatch b = good;  // tokens of the wrong width
    b.tokens =
        Tensor::FromVector({2, h + 1}, std::vector<float>(x.begin(), x.begin() + 2 * (h + 1)));
    bad.push_back({"wide tokens", b});
  }
  {
    ExpertBatch b = good;
    b.tokens = Tensor::FromVector({2 * h}, std::vector<float>(x.begin(), x.begin() + 2 * h));
    bad.push_back({"1-D tokens", b});
  }
  {
    ExpertBatch b = good;
    b.tokens = Tensor();
    bad.push_back({"no tokens", b});
  }
  {
    ExpertBatch b = good;
    b.offsets = {0, 1};  // n entries instead of n + 1
    bad.push_back({"short offsets", b});
  }
  {
    ExpertBatch b = good;
    b.offsets = {1, 1, 3};
    bad.push_back({"offsets not starting at 0", b});
  }
  {
    ExpertBatch b = good;
    b.offsets = {0, 2, 1};
    bad.push_back({"decreasing offsets", b});
  }
  {
    ExpertBatch b = good;
    b.offsets = {0, 1, 4};  // past the 3 assignments
    bad.push_back({"offsets past the assignments", b});
  }
  {
    ExpertBatch b = good;
    b.offsets = {0, 1, 2};  // one assignment left over
    bad.push_back({"offsets short of the assignments", b});
  }
  {
    ExpertBatch b = good;
    b.assignments[0].expert = 8;
    bad.push_back({"expert out of range", b});
  }
  {
    ExpertBatch b = good;
    b.assignments[2].expert = -7;
    bad.push_back({"negative expert", b});
  }
  {
    ExpertBatch b = good;
    b.assignments[1].weight = std::nanf("");
    bad.push_back({"NaN weight", b});
  }
  {
    ExpertBatch b = good;
    b.offsets.clear();
    bad.push_back({"no offsets", b});
  }
  for (const auto& [what, b] : bad) {
    absl::StatusOr<Tensor> out = (*group)->Run(b);
    ASSERT_FALSE(out.ok()) << what;
    EXPECT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument)
        << what << ": " << out.status();
    EXPECT_EQ(ValidateExpertBatch(b, h, cfg_.num_experts).code(),
              absl::StatusCode::kInvalidArgument)
        << what;
  }
}

TEST_F(MoeTest, LoadRejectsExpertsTheModelDoesNotHave) {
  for (ExpertKey k : {ExpertKey{2, 0}, ExpertKey{-1, 0}, ExpertKey{0, 8}, ExpertKey{0, -5},
                      ExpertKey{0, kSharedExpertId}}) {
    auto g = LocalExpertGroup::Load(*ckpt_, cfg_, {k}, backend_.get());
    EXPECT_FALSE(g.ok()) << "layer " << k.layer << " expert " << k.expert;
    if (!g.ok()) {
      EXPECT_EQ(g.status().code(), absl::StatusCode::kInvalidArgument) << g.status();
    }
  }
}

// ---- MoeDispatcher --------------------------------------------------------------------------

TEST_F(MoeTest, DispatcherMatchesNaiveForAnyGroupCount) {
  const int64_t t = 9, h = cfg_.hidden_size;
  const std::vector<float> x = RandomFloats(t * h, 6, 1.5f);
  const Tensor hidden = Tensor::FromVector({t, h}, x);
  std::vector<std::vector<float>> reference;  // per layer, from one group
  for (int groups : {1, 2, 4}) {
    std::vector<std::vector<ExpertKey>> placement;
    for (int g = 0; g < groups; ++g) placement.push_back(DefaultPlacement(cfg_, g, groups));
    auto d = MakeDispatcher(placement);
    ASSERT_TRUE(d.ok()) << d.status();
    for (int layer : {0, 1}) {
      absl::StatusOr<Tensor> out = (*d)->Forward(layer, hidden, CallOptions{});
      ASSERT_TRUE(out.ok()) << out.status();
      ASSERT_THAT(out->shape(), ElementsAre(t, h));
      const std::vector<float> naive = NaiveMoe(layer, x, t);
      const std::vector<float> zeros(t * h, 0.0f);
      ASSERT_GT(MaxAbsDiff(naive.data(), zeros.data(), t * h), 0.1) << "a vacuous comparison";
      EXPECT_LE(MaxAbsDiff(out->data(), naive.data(), t * h), 1e-5)
          << groups << " groups, layer " << layer;
      if (groups == 1) {
        reference.emplace_back(out->span().begin(), out->span().end());
      } else {
        EXPECT_LE(MaxAbsDiff(out->data(), reference[layer].data(), t * h), 1e-5)
            << groups << " groups vs 1, layer " << layer;
      }
    }
  }
}

TEST_F(MoeTest, DefaultPlacementSplitsEvenly) {
  for (int groups : {1, 2, 3, 4, 8}) {
    std::vector<int> count(cfg_.num_experts * cfg_.num_layers, 0);
    for (int g = 0; g < groups; ++g) {
      const std::vector<ExpertKey> keys = DefaultPlacement(cfg_, g, groups);
      EXPECT_GE(keys.size(), static_cast<size_t>(cfg_.num_layers * (cfg_.num_experts / groups)));
      EXPECT_LE(keys.size(),
                static_cast<size_t>(cfg_.num_layers * ((cfg_.num_experts + groups - 1) / groups)));
      for (const ExpertKey& k : keys) ++count[k.layer * cfg_.num_experts + k.expert];
    }
    EXPECT_THAT(count, ::testing::Each(1)) << groups << " groups";
  }
}

TEST_F(MoeTest, DispatchStats) {
  const int64_t t = 7, h = cfg_.hidden_size;
  const Tensor hidden = Tensor::FromVector({t, h}, RandomFloats(t * h, 7));
  for (int groups : {1, 4}) {
    std::vector<std::vector<ExpertKey>> placement;
    for (int g = 0; g < groups; ++g) placement.push_back(DefaultPlacement(cfg_, g, groups));
    auto d = MakeDispatcher(placement);
    ASSERT_TRUE(d.ok()) << d.status();
    DispatchStats stats;
    int calls = 0;
    absl::StatusOr<Tensor> result;
    (*d)->ForwardAsync(1, hidden, CallOptions{},
                       [&](absl::StatusOr<Tensor> r, const DispatchStats& s) {
                         ++calls;
                         result = std::move(r);
                         stats = s;
                       });
    ASSERT_EQ(calls, 1);  // local groups answer inline
    ASSERT_TRUE(result.ok()) << result.status();
    EXPECT_EQ(stats.tokens, t);
    ASSERT_EQ(stats.expert_tokens.size(), 8u);
    EXPECT_EQ(std::accumulate(stats.expert_tokens.begin(), stats.expert_tokens.end(), int64_t{0}),
              t * cfg_.top_k);
    if (groups == 1) {
      EXPECT_EQ(stats.token_sends, t);  // each token once to the only group
    } else {
      EXPECT_GE(stats.token_sends, t);
      EXPECT_LE(stats.token_sends, t * cfg_.top_k);
    }
  }
}

TEST_F(MoeTest, RedundantExpertsGiveTheSameOutput) {
  // Group 0 holds everything; group 1 holds experts 0-3 again.
  std::vector<ExpertKey> extra;
  for (int l = 0; l < 2; ++l)
    for (int e = 0; e < 4; ++e) extra.push_back({l, e});
  auto redundant = MakeDispatcher({AllExperts(), extra});
  ASSERT_TRUE(redundant.ok()) << redundant.status();
  auto single = MakeDispatcher({AllExperts()});
  ASSERT_TRUE(single.ok()) << single.status();
  const int64_t t = 11, h = cfg_.hidden_size;
  const Tensor hidden = Tensor::FromVector({t, h}, RandomFloats(t * h, 8));
  for (int layer : {0, 1}) {
    auto a = (*redundant)->Forward(layer, hidden, CallOptions{});
    auto b = (*single)->Forward(layer, hidden, CallOptions{});
    ASSERT_TRUE(a.ok()) << a.status();
    ASSERT_TRUE(b.ok()) << b.status();
    EXPECT_LE(MaxAbsDiff(a->data(), b->data(), t * h), 1e-5);
  }
}

TEST_F(MoeTest, CreateFailsNamingMissingExperts) {
  std::vector<ExpertKey> keys = AllExperts();
  keys.erase(std::remove(keys.begin(), keys.end(), ExpertKey{1, 7}), keys.end());
  keys.erase(std::remove(keys.begin(), keys.end(), ExpertKey{0, 2}), keys.end());
  auto d = MakeDispatcher({keys});
  ASSERT_FALSE(d.ok());
  EXPECT_EQ(d.status().code(), absl::StatusCode::kFailedPrecondition) << d.status();
  EXPECT_THAT(Msg(d.status()), HasSubstr("(layer 1, expert 7)"));
  EXPECT_THAT(Msg(d.status()), HasSubstr("(layer 0, expert 2)"));
  EXPECT_THAT(Msg(d.status()), ::testing::Not(HasSubstr("(layer 0, expert 1)")));

  // A missing gate is also reported.
  auto group = LocalExpertGroup::Load(*ckpt_, cfg_, AllExperts(), backend_.get());
  ASSERT_TRUE(group.ok());
  auto gates = MoeDispatcher::LoadGates(*ckpt_, cfg_);
  ASSERT_TRUE(gates.ok()) << gates.status();
  EXPECT_EQ(gates->size(), 2u);
  gates->erase(1);
  std::vector<MoeDispatcher::GroupEntry> groups;
  groups.push_back({std::shared_ptr<ExpertGroup>(std::move(*group)), AllExperts()});
  auto d2 = MoeDispatcher::Create(cfg_, std::move(*gates), std::move(groups), backend_.get());
  ASSERT_FALSE(d2.ok());
  EXPECT_EQ(d2.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(Msg(d2.status()), HasSubstr("layer 1"));
}

TEST_F(MoeTest, ForwardRejectsBadInput) {
  auto d = MakeDispatcher({AllExperts()});
  ASSERT_TRUE(d.ok()) << d.status();
  const int64_t h = cfg_.hidden_size;
  auto r = (*d)->Forward(2, Tensor::FromVector({1, h}, RandomFloats(h, 9)), CallOptions{});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
  r = (*d)->Forward(0, Tensor::FromVector({1, h + 1}, RandomFloats(h + 1, 9)), CallOptions{});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
  r = (*d)->Forward(0, Tensor(), CallOptions{});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
}

// A group that answers from its own thread, as a network client would.
class ThreadedGroup final : public ExpertGroup {
 public:
  explicit ThreadedGroup(std::unique_ptr<LocalExpertGroup> inner) : inner_(std::move(inner)) {}
  ~ThreadedGroup() override {
    std::lock_guard<std::mutex> lock(mu_);
    for (std::thread& t : threads_) t.join();
  }
  std::string name() const override { return "threaded"; }
  void RunExpertsAsync(std::shared_ptr<const ExpertBatch> batch, const CallOptions& opts,
                       ExpertDone done) override {
    std::lock_guard<std::mutex> lock(mu_);
    threads_.emplace_back([this, batch, done = std::move(done)] { done(inner_->Run(*batch)); });
  }

 private:
  std::unique_ptr<LocalExpertGroup> inner_;
  std::mutex mu_;
  std::vector<std::thread> threads_;
};

// A group whose every call fails, as a dead worker would.
class FailingGroup final : public ExpertGroup {
 public:
  std::string name() const override { return "dead-worker"; }
  void RunExpertsAsync(std::shared_ptr<const ExpertBatch>, const CallOptions&,
                       ExpertDone done) override {
    done(absl::UnavailableError("connection refused"));
  }
};

TEST_F(MoeTest, GroupsAnsweringFromOtherThreads) {
  std::vector<MoeDispatcher::GroupEntry> groups;
  for (int g = 0; g < 4; ++g) {
    const std::vector<ExpertKey> keys = DefaultPlacement(cfg_, g, 4);
    auto local = LocalExpertGroup::Load(*ckpt_, cfg_, keys, backend_.get());
    ASSERT_TRUE(local.ok()) << local.status();
    groups.push_back({std::make_shared<ThreadedGroup>(std::move(*local)), keys});
  }
  auto gates = MoeDispatcher::LoadGates(*ckpt_, cfg_);
  ASSERT_TRUE(gates.ok());
  auto d = MoeDispatcher::Create(cfg_, std::move(*gates), std::move(groups), backend_.get());
  ASSERT_TRUE(d.ok()) << d.status();
  const int64_t t = 8, h = cfg_.hidden_size;
  const std::vector<float> x = RandomFloats(t * h, 10);
  for (int rep = 0; rep < 3; ++rep) {
    auto out = (*d)->Forward(0, Tensor::FromVector({t, h}, x), CallOptions{});
    ASSERT_TRUE(out.ok()) << out.status();
    const std::vector<float> naive = NaiveMoe(0, x, t);
    EXPECT_LE(MaxAbsDiff(out->data(), naive.data(), t * h), 1e-5);
  }
}

TEST_F(MoeTest, FailingGroupFailsTheCallWithItsCode) {
  std::vector<MoeDispatcher::GroupEntry> groups;
  const std::vector<ExpertKey> first = DefaultPlacement(cfg_, 0, 2);
  auto local = LocalExpertGroup::Load(*ckpt_, cfg_, first, backend_.get());
  ASSERT_TRUE(local.ok());
  groups.push_back({std::shared_ptr<ExpertGroup>(std::move(*local)), first});
  groups.push_back({std::make_shared<FailingGroup>(), DefaultPlacement(cfg_, 1, 2)});
  auto gates = MoeDispatcher::LoadGates(*ckpt_, cfg_);
  ASSERT_TRUE(gates.ok());
  auto d = MoeDispatcher::Create(cfg_, std::move(*gates), std::move(groups), backend_.get());
  ASSERT_TRUE(d.ok()) << d.status();
  // With 16 tokens and top-2 of 8, some token surely uses experts 4-7.
  const int64_t t = 16, h = cfg_.hidden_size;
  auto out = (*d)->Forward(0, Tensor::FromVector({t, h}, RandomFloats(t * h, 11)), CallOptions{});
  ASSERT_FALSE(out.ok());
  EXPECT_EQ(out.status().code(), absl::StatusCode::kUnavailable) << out.status();
  EXPECT_THAT(Msg(out.status()), HasSubstr("dead-worker"));
  EXPECT_THAT(Msg(out.status()), HasSubstr("connection refused"));
}

// ---- ParseIdRanges --------------------------------------------------------------------------

TEST(ParseIdRangesTest, Valid) {
  auto ids = ParseIdRanges("0-3,6,9-10");
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_THAT(*ids, ElementsAre(0, 1, 2, 3, 6, 9, 10));
  ids = ParseIdRanges("5");
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_THAT(*ids, ElementsAre(5));
  ids = ParseIdRanges("7,2-3,3,1");  // sorted, duplicates dropped
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_THAT(*ids, ElementsAre(1, 2, 3, 7));
  ids = ParseIdRanges("4-4");
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_THAT(*ids, ElementsAre(4));
}

TEST(ParseIdRangesTest, LargestIdsTerminate) {
  // The loop over a range must not overflow at INT_MAX.
  auto ids = ParseIdRanges("2147483647");
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_THAT(*ids, ElementsAre(2147483647));
  ids = ParseIdRanges("2147483646-2147483647,0");
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_THAT(*ids, ElementsAre(0, 2147483646, 2147483647));
  EXPECT_FALSE(ParseIdRanges("2147483648").ok());  // does not fit an int
}

TEST(ParseIdRangesTest, Invalid) {
  for (const char* spec : {"", "a", "3-1", "1-", "-1", "1-2-3", "1.5", "x-2", "0-3,b", ","}) {
    auto ids = ParseIdRanges(spec);
    EXPECT_FALSE(ids.ok()) << "'" << spec << "' parsed";
    if (!ids.ok()) {
      EXPECT_EQ(ids.status().code(), absl::StatusCode::kInvalidArgument) << spec;
    }
  }
}

}  // namespace
}  // namespace moemesh
