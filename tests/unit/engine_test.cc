// The single-process engine against a reference forward pass written here from the published
// Mixtral semantics (HF modeling_mixtral), sharing no code with the engine: weights are read
// with Checkpoint::LoadF32 and everything else is plain loops in double. Then the engine's own
// consistency (prefill vs decode, batching), the scheduler, and input errors.
#include "services/engine/engine.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <memory>
#include <numeric>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "services/engine/inproc.h"
#include "services/engine/sampler.h"
#include "services/engine/scheduler.h"
#include "services/model/generator.h"
#include "services/model/safetensors.h"
#include "tests/test_util.h"

namespace moemesh {
namespace {

using ::moemesh::testing::MaxAbsDiff;
using ::moemesh::testing::TempDir;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

using Mat = std::vector<std::vector<double>>;  // [rows][cols]

// ---- the reference model -----------------------------------------------------------------

class ReferenceMixtral {
 public:
  // `cfg` is the configuration the test generated the checkpoint with.
  ReferenceMixtral(const ModelConfig& cfg, const std::string& dir) : c_(cfg) {
    auto ckpt = Checkpoint::Open(dir);
    EXPECT_TRUE(ckpt.ok()) << ckpt.status();
    if (ckpt.ok()) ckpt_ = std::move(*ckpt);
  }

  // Logits of every position: [n][vocab].
  Mat Forward(const std::vector<int32_t>& tokens) const {
    const int n = static_cast<int>(tokens.size());
    const int h = c_.hidden_size, v = c_.vocab_size;
    const Mat embed = W("model.embed_tokens.weight", v, h);
    Mat x(n);
    for (int i = 0; i < n; ++i) x[i] = embed[tokens[i]];
    for (int l = 0; l < c_.num_layers; ++l) {
      const std::string p = absl::StrCat("model.layers.", l, ".");
      Mat xn = RmsNorm(x, Vec(p + "input_layernorm.weight"));
      Add(&x, Attention(p, xn));
      xn = RmsNorm(x, Vec(p + "post_attention_layernorm.weight"));
      Add(&x, Moe(p, xn));
    }
    const Mat xf = RmsNorm(x, Vec("model.norm.weight"));
    return MatMulT(xf, W("lm_head.weight", v, h));
  }

 private:
  std::vector<double> Vec(const std::string& name) const {
    auto t = ckpt_->LoadF32(name);
    EXPECT_TRUE(t.ok()) << t.status();
    if (!t.ok()) return {};
    return std::vector<double>(t->span().begin(), t->span().end());
  }
  Mat W(const std::string& name, int rows, int cols) const {
    const std::vector<double> flat = Vec(name);
    EXPECT_EQ(flat.size(), static_cast<size_t>(rows) * cols) << name;
    Mat m(rows, std::vector<double>(cols));
    for (int r = 0; r < rows && flat.size() == static_cast<size_t>(rows) * cols; ++r)
      for (int k = 0; k < cols; ++k) m[r][k] = flat[r * cols + k];
    return m;
  }
  // x[n][k] · w[m][k]ᵀ.
  static Mat MatMulT(const Mat& x, const Mat& w) {
    Mat y(x.size(), std::vector<double>(w.size(), 0.0));
    for (size_t i = 0; i < x.size(); ++i)
      for (size_t j = 0; j < w.size(); ++j)
        for (size_t k = 0; k < x[i].size(); ++k) y[i][j] += x[i][k] * w[j][k];
    return y;
  }
  static void Add(Mat* x, const Mat& y) {
    for (size_t i = 0; i < x->size(); ++i)
      for (size_t j = 0; j < (*x)[i].size(); ++j) (*x)[i][j] += y[i][j];
  }
  Mat RmsNorm(const Mat& x, const std::vector<double>& w) const {
    Mat y = x;
    for (auto& row : y) {
      double ms = 0;
      for (double a : row) ms += a * a;
      ms /= row.size();
      const double inv = 1.0 / std::sqrt(ms + c_.rms_norm_eps);
      for (size_t j = 0; j < row.size(); ++j) row[j] = row[j] * inv * w[j];
    }
    return y;
  }
  // HF rotate_half rotary embedding of every head of every row; row i is at position i.
  void Rope(Mat* m, int heads) const {
    const int hd = c_.head_dim, half = hd / 2;
    for (size_t pos = 0; pos < m->size(); ++pos) {
      for (int hh = 0; hh < heads; ++hh) {
        double* q = (*m)[pos].data() + hh * hd;
        for (int i = 0; i < half; ++i) {
          const double inv_freq = std::pow(static_cast<double>(c_.rope_theta), -2.0 * i / hd);
          const double a = pos * inv_freq, cs = std::cos(a), sn = std::sin(a);
          const double x1 = q[i], x2 = q[i + half];
          q[i] = x1 * cs - x2 * sn;
          q[i + half] = x2 * cs + x1 * sn;
        }
      }
    }
  }
  Mat Attention(const std::string& p, const Mat& xn) const {
    const int h = c_.hidden_size, hd = c_.head_dim, nh = c_.num_heads, nkv = c_.num_kv_heads;
    Mat q = MatMulT(xn, W(p + "self_attn.q_proj.weight", nh * hd, h));
    Mat k = MatMulT(xn, W(p + "self_attn.k_proj.weight", nkv * hd, h));
    const Mat v = MatMulT(xn, W(p + "self_attn.v_proj.weight", nkv * hd, h));
    Rope(&q, nh);
    Rope(&k, nkv);
    const int n = static_cast<int>(xn.size());
    Mat out(n, std::vector<double>(nh * hd, 0.0));
    for (int i = 0; i < n; ++i) {
      for (int hh = 0; hh < nh; ++hh) {
        const int g = hh / (nh / nkv);  // repeat_kv
        std::vector<double> s(i + 1);
        double mx = -1e300;
        for (int j = 0; j <= i; ++j) {
          double d = 0;
          for (int c = 0; c < hd; ++c) d += q[i][hh * hd + c] * k[j][g * hd + c];
          s[j] = d / std::sqrt(static_cast<double>(hd));
          mx = std::max(mx, s[j]);
        }
        double z = 0;
        for (double& a : s) z += (a = std::exp(a - mx));
        for (int j = 0; j <= i; ++j)
          for (int c = 0; c < hd; ++c) out[i][hh * hd + c] += s[j] / z * v[j][g * hd + c];
      }
    }
    return MatMulT(out, W(p + "self_attn.o_proj.weight", h, nh * hd));
  }
  Mat Moe(const std::string& p, const Mat& xn) const {
    const int h = c_.hidden_size, ne = c_.num_experts, inter = c_.intermediate_size;
    const Mat logits = MatMulT(xn, W(p + "block_sparse_moe.gate.weight", ne, h));
    Mat out(xn.size(), std::vector<double>(h, 0.0));
    for (size_t i = 0; i < xn.size(); ++i) {
      std::vector<double> pr = logits[i];
      const double mx = *std::max_element(pr.begin(), pr.end());
      double z = 0;
      for (double& a : pr) z += (a = std::exp(a - mx));
      for (double& a : pr) a /= z;
      std::vector<int> order(ne);
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return pr[a] > pr[b]; });
      double chosen = 0;
      for (int j = 0; j < c_.top_k; ++j) chosen += pr[order[j]];
      for (int j = 0; j < c_.top_k; ++j) {
        const std::string e = absl::StrCat(p, "block_sparse_moe.experts.", order[j], ".");
        const Mat w1 = W(e + "w1.weight", inter, h), w3 = W(e + "w3.weight", inter, h),
                  w2 = W(e + "w2.weight", h, inter);
        const Mat g = MatMulT({xn[i]}, w1), u = MatMulT({xn[i]}, w3);
        Mat a(1, std::vector<double>(inter));
        for (int r = 0; r < inter; ++r) a[0][r] = g[0][r] / (1 + std::exp(-g[0][r])) * u[0][r];
        const Mat y = MatMulT(a, w2);
        for (int c = 0; c < h; ++c) out[i][c] += pr[order[j]] / chosen * y[0][c];
      }
    }
    return out;
  }

  ModelConfig c_;
  std::unique_ptr<Checkpoint> ckpt_;
};

double MaxDiff(const Tensor& t, const Mat& ref) {
  double m = 0;
  EXPECT_EQ(t.dim(0), static_cast<int64_t>(ref.size()));
  for (int64_t i = 0; i < t.dim(0) && i < static_cast<int64_t>(ref.size()); ++i) {
    EXPECT_EQ(t.dim(1), static_cast<int64_t>(ref[i].size()));
    for (int64_t j = 0; j < t.dim(1); ++j) m = std::max(m, std::fabs(t.row(i)[j] - ref[i][j]));
  }
  return m;
}

// ---- fixture: one generated model shared by the suite ----------------------------------------

class EngineTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir();
    GeneratorOptions o;
    o.config = SmallMixtralConfig();
    o.seed = 7;
    model_ = new std::string(moemesh::testing::MakeModel(*dir_, "f32", o));
  }
  static void TearDownTestSuite() {
    delete model_;
    delete dir_;
  }
  void SetUp() override {
    auto m = InprocModel::Load(*model_);
    ASSERT_TRUE(m.ok()) << m.status();
    m_ = std::move(*m);
  }
  Engine& engine() { return *m_->engine; }

  static std::vector<int32_t> Prompt(int n, int salt) {
    std::vector<int32_t> t;
    for (int i = 0; i < n; ++i) t.push_back((i * 37 + salt * 11 + 5) % 96);
    return t;
  }

  static TempDir* dir_;
  static std::string* model_;
  std::unique_ptr<InprocModel> m_;
};

TempDir* EngineTest::dir_ = nullptr;
std::string* EngineTest::model_ = nullptr;

TEST_F(EngineTest, ScoreMatchesReferenceForwardPass) {
  const ModelConfig cfg = SmallMixtralConfig();
  ASSERT_EQ(cfg.num_heads / cfg.num_kv_heads, 2) << "the model must exercise GQA";
  const ReferenceMixtral ref(cfg, *model_);
  for (const std::vector<int32_t>& tokens :
       {Prompt(10, 1), Prompt(1, 2), std::vector<int32_t>{0, 95, 95, 3}}) {
    absl::StatusOr<Tensor> logits = engine().Score(tokens);
    ASSERT_TRUE(logits.ok()) << logits.status();
    ASSERT_THAT(logits->shape(), ElementsAre(static_cast<int64_t>(tokens.size()), 96));
    const Mat expect = ref.Forward(tokens);
    EXPECT_LE(MaxDiff(*logits, expect), 1e-4) << tokens.size() << " tokens";
    // The logits must be informative for the comparison to mean anything.
    double spread = 0;
    for (double a : expect.back()) spread = std::max(spread, std::fabs(a));
    EXPECT_GT(spread, 1.0);
  }
}

TEST_F(EngineTest, PrefillThenDecodeEqualsScore) {
  const std::vector<int32_t> tokens = Prompt(12, 3);
  absl::StatusOr<Tensor> full = engine().Score(tokens);
  ASSERT_TRUE(full.ok()) << full.status();
  const int64_t v = 96;

  auto seq = engine().NewSequence();
  const int prefill = 5;
  StepInput in{seq.get(), absl::MakeConstSpan(tokens.data(), prefill), /*all_logits=*/true};
  auto out = engine().Step({&in, 1});
  ASSERT_TRUE(out.ok()) << out.status();
  ASSERT_EQ(out->size(), 1u);
  ASSERT_THAT((*out)[0].shape(), ElementsAre(prefill, v));
  EXPECT_LE(MaxAbsDiff((*out)[0].data(), full->data(), prefill * v), 1e-4);
  EXPECT_EQ(seq->length(), prefill);

  for (size_t i = prefill; i < tokens.size(); ++i) {
    StepInput d{seq.get(), absl::MakeConstSpan(tokens.data() + i, 1), false};
    auto o = engine().Step({&d, 1});
    ASSERT_TRUE(o.ok()) << o.status();
    ASSERT_THAT((*o)[0].shape(), ElementsAre(1, v));
    EXPECT_LE(MaxAbsDiff((*o)[0].data(), full->row(i), v), 1e-4) << "position " << i;
    EXPECT_EQ(seq->length(), static_cast<int64_t>(i + 1));
  }
}

TEST_F(EngineTest, LastLogitsOnlyByDefault) {
  const std::vector<int32_t> tokens = Prompt(6, 4);
  absl::StatusOr<Tensor> full = engine().Score(tokens);
  ASSERT_TRUE(full.ok()) << full.status();
  auto seq = engine().NewSequence();
  StepInput in{seq.get(), tokens, false};
  auto out = engine().Step({&in, 1});
  ASSERT_TRUE(out.ok()) << out.status();
  ASSERT_THAT((*out)[0].shape(), ElementsAre(1, 96));
  EXPECT_LE(MaxAbsDiff((*out)[0].data(), full->row(5), 96), 1e-4);
}

TEST_F(EngineTest, BatchOfSequencesEqualsEachAlone) {
  const std::vector<int32_t> a = Prompt(3, 5), b = Prompt(7, 6), c = Prompt(1, 7);
  const std::vector<int32_t> d = Prompt(5, 8);  // decoded: 4 tokens earlier, 1 in the batch
  std::map<std::string, Tensor> alone;
  for (const auto& [name, toks] : std::vector<std::pair<std::string, std::vector<int32_t>>>{
           {"a", a}, {"b", b}, {"c", c}, {"d", d}}) {
    auto s = engine().Score(toks);
    ASSERT_TRUE(s.ok()) << s.status();
    alone[name] = *s;
  }
  auto sa = engine().NewSequence(), sb = engine().NewSequence(), sc = engine().NewSequence(),
       sd = engine().NewSequence();
  StepInput pre{sd.get(), absl::MakeConstSpan(d.data(), 4), false};
  ASSERT_TRUE(engine().Step({&pre, 1}).ok());
  const std::vector<StepInput> inputs = {{sa.get(), a, true},
                                         {sd.get(), absl::MakeConstSpan(d.data() + 4, 1), true},
                                         {sb.get(), b, true},
                                         {sc.get(), c, false}};
  auto out = engine().Step(inputs);
  ASSERT_TRUE(out.ok()) << out.status();
  ASSERT_EQ(out->size(), 4u);
  EXPECT_LE(MaxAbsDiff((*out)[0].data(), alone["a"].data(), 3 * 96), 1e-4);
  EXPECT_LE(MaxAbsDiff((*out)[1].data(), alone["d"].row(4), 96), 1e-4);
  EXPECT_LE(MaxAbsDiff((*out)[2].data(), alone["b"].data(), 7 * 96), 1e-4);
  ASSERT_THAT((*out)[3].shape(), ElementsAre(1, 96));
  EXPECT_LE(MaxAbsDiff((*out)[3].data(), alone["c"].data(), 96), 1e-4);
  EXPECT_EQ(sa->length(), 3);
  EXPECT_EQ(sb->length(), 7);
  EXPECT_EQ(sc->length(), 1);
  EXPECT_EQ(sd->length(), 5);
}

TEST_F(EngineTest, GroupCountDoesNotChangeLogits) {
  const std::vector<int32_t> tokens = Prompt(9, 9);
  auto one = engine().Score(tokens);
  ASSERT_TRUE(one.ok()) << one.status();
  for (int groups : {2, 4, 8}) {
    InprocOptions o;
    o.groups = groups;
    auto m = InprocModel::Load(*model_, o);
    ASSERT_TRUE(m.ok()) << m.status();
    auto s = (*m)->engine->Score(tokens);
    ASSERT_TRUE(s.ok()) << s.status();
    EXPECT_LE(MaxAbsDiff(s->data(), one->data(), one->numel()), 1e-4) << groups << " groups";
  }
  InprocOptions bad;
  bad.groups = 9;
  EXPECT_EQ(InprocModel::Load(*model_, bad).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(EngineTest, TopKOverride) {
  const ModelConfig base = SmallMixtralConfig();
  InprocOptions o;
  o.top_k = 3;
  auto m = InprocModel::Load(*model_, o);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->get()->config.top_k, 3);
  const std::vector<int32_t> tokens = Prompt(4, 10);
  auto s = (*m)->engine->Score(tokens);
  ASSERT_TRUE(s.ok()) << s.status();
  ModelConfig k3 = base;
  k3.top_k = 3;
  EXPECT_LE(MaxDiff(*s, ReferenceMixtral(k3, *model_).Forward(tokens)), 1e-4);
  o.top_k = 9;
  EXPECT_EQ(InprocModel::Load(*model_, o).status().code(), absl::StatusCode::kInvalidArgument);
}

// ---- input errors ---------------------------------------------------------------------------

TEST_F(EngineTest, OutOfVocabularyTokenIsInvalidArgument) {
  for (int32_t bad : {96, -1, 1 << 30}) {
    auto s = engine().Score({1, 2, bad});
    ASSERT_FALSE(s.ok()) << bad;
    EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument) << s.status();
    EXPECT_THAT(std::string(s.status().message()), HasSubstr(absl::StrCat(bad)));
  }
  // A failed step advances no sequence, including the valid ones batched with it.
  auto good = engine().NewSequence(), bad = engine().NewSequence();
  const std::vector<int32_t> ok_tokens = {1, 2, 3};
  const std::vector<int32_t> bad_tokens = {4, 96};
  const std::vector<StepInput> inputs = {{good.get(), ok_tokens, false},
                                         {bad.get(), bad_tokens, false}};
  auto out = engine().Step(inputs);
  EXPECT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(good->length(), 0);
  EXPECT_EQ(bad->length(), 0);
  // And the sequence is still usable afterwards.
  StepInput retry{good.get(), ok_tokens, true};
  auto r = engine().Step({&retry, 1});
  ASSERT_TRUE(r.ok()) << r.status();
  auto full = engine().Score(ok_tokens);
  ASSERT_TRUE(full.ok());
  EXPECT_LE(MaxAbsDiff((*r)[0].data(), full->data(), 3 * 96), 1e-4);
}

TEST_F(EngineTest, EmptyInputsAreRejected) {
  EXPECT_EQ(engine().Score({}).status().code(), absl::StatusCode::kInvalidArgument);
  auto seq = engine().NewSequence();
  StepInput empty{seq.get(), {}, false};
  EXPECT_EQ(engine().Step({&empty, 1}).status().code(), absl::StatusCode::kInvalidArgument);
  const std::vector<int32_t> one = {1};
  StepInput no_seq{nullptr, one, false};
  EXPECT_EQ(engine().Step({&no_seq, 1}).status().code(), absl::StatusCode::kInvalidArgument);
}

// ---- other dtypes and layouts -----------------------------------------------------------------

class EngineDTypeTest : public ::testing::TestWithParam<DType> {};

TEST_P(EngineDTypeTest, GeneratedModelLoadsAndMatchesReference) {
  TempDir dir;
  GeneratorOptions o;
  o.config = SmallMixtralConfig();
  o.seed = 7;
  o.dtype = GetParam();
  const std::string path = moemesh::testing::MakeModel(dir, "m", o);
  {
    auto ckpt = Checkpoint::Open(path);
    ASSERT_TRUE(ckpt.ok()) << ckpt.status();
    auto info = (*ckpt)->Info("model.layers.1.block_sparse_moe.experts.3.w2.weight");
    ASSERT_TRUE(info.ok()) << info.status();
    EXPECT_EQ(info->dtype, GetParam());
  }
  auto m = InprocModel::Load(path);
  ASSERT_TRUE(m.ok()) << m.status();
  const std::vector<int32_t> tokens = {3, 14, 15, 92, 65, 35};
  auto s = (*m)->engine->Score(tokens);
  ASSERT_TRUE(s.ok()) << s.status();
  for (float x : s->span()) ASSERT_TRUE(std::isfinite(x));
  EXPECT_LE(MaxDiff(*s, ReferenceMixtral(o.config, path).Forward(tokens)), 1e-4);
}

INSTANTIATE_TEST_SUITE_P(Dtypes, EngineDTypeTest, ::testing::Values(DType::kBF16, DType::kF16),
                         [](const auto& info) { return std::string(DTypeName(info.param)); });

TEST(EngineLayoutTest, ShardedCheckpointGivesTheSameLogits) {
  TempDir dir;
  GeneratorOptions o;
  o.config = SmallMixtralConfig();
  o.seed = 11;
  const std::string single = moemesh::testing::MakeModel(dir, "single", o);
  o.shard_bytes = 64 << 10;
  const std::string sharded = moemesh::testing::MakeModel(dir, "sharded", o);
  auto a = InprocModel::Load(single);
  auto b = InprocModel::Load(sharded);
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_GT((*b)->checkpoint->OpenedFiles(), 1);
  const std::vector<int32_t> tokens = {1, 2, 3, 4, 5};
  auto la = (*a)->engine->Score(tokens);
  auto lb = (*b)->engine->Score(tokens);
  ASSERT_TRUE(la.ok() && lb.ok());
  EXPECT_LE(MaxAbsDiff(la->data(), lb->data(), la->numel()), 1e-6);
}

// ---- sampler ----------------------------------------------------------------------------------

TEST(SamplerTest, GreedyIsArgmaxWithLowestIdOnTies) {
  EXPECT_EQ(Argmax(std::vector<float>{1, 3, 3, 2}), 1);
  EXPECT_EQ(Argmax(std::vector<float>{-5, -4, -6}), 1);
  Sampler s(SamplingParams{});
  EXPECT_EQ(s.Sample(std::vector<float>{0, 0, 9, 9}), 2);
}

TEST(SamplerTest, TopKOneIsGreedyAndTopPRestricts) {
  const std::vector<float> logits = {0, 1, 5, 4.9f, -2};
  for (uint64_t seed = 0; seed < 20; ++seed) {
    Sampler k1(SamplingParams{.temperature = 5.0f, .top_k = 1, .top_p = 1.0f, .seed = seed});
    EXPECT_EQ(k1.Sample(logits), 2);
    // Ids 2 and 3 hold almost all of the mass at temperature 1; top_p 0.5 keeps only id 2.
    Sampler p(SamplingParams{.temperature = 1.0f, .top_k = 0, .top_p = 0.5f, .seed = seed});
    EXPECT_EQ(p.Sample(logits), 2);
    Sampler k2(SamplingParams{.temperature = 100.0f, .top_k = 2, .top_p = 1.0f, .seed = seed});
    const int32_t t = k2.Sample(logits);
    EXPECT_TRUE(t == 2 || t == 3) << t;
  }
}

TEST(SamplerTest, ValidateSampling) {
  EXPECT_TRUE(ValidateSampling(SamplingParams{}).ok());
  EXPECT_FALSE(ValidateSampling(SamplingParams{.temperature = -1}).ok());
  EXPECT_FALSE(ValidateSampling(SamplingParams{.temperature = NAN}).ok());
  EXPECT_FALSE(ValidateSampling(SamplingParams{.temperature = 1, .top_k = -1}).ok());
  EXPECT_FALSE(ValidateSampling(SamplingParams{.temperature = 1, .top_k = 0, .top_p = 0}).ok());
  EXPECT_FALSE(ValidateSampling(SamplingParams{.temperature = 1, .top_k = 0, .top_p = 1.5f}).ok());
}

// ---- scheduler --------------------------------------------------------------------------------

struct Outcome {
  std::vector<int32_t> tokens;
  std::string finish_reason;
  absl::Status status;
  Tensor logits;
  int64_t completion_tokens = -1;
  int events_after_done = 0;
};

// Submits each request and waits for all of them to finish.
std::vector<Outcome> RunAll(Scheduler& sched, const std::vector<GenerationRequest>& reqs) {
  struct State {
    absl::Mutex mu;
    std::vector<Outcome> out;
    std::vector<bool> done;
    int remaining = 0;
    // Events wait until every request is queued, so that the scheduler sees them together
    // however fast it runs (otherwise a tiny model can finish one before the next arrives).
    bool all_submitted = false;
  };
  auto st = std::make_shared<State>();
  st->out.resize(reqs.size());
  st->done.assign(reqs.size(), false);
  st->remaining = static_cast<int>(reqs.size());
  for (size_t i = 0; i < reqs.size(); ++i) {
    absl::Status s = sched.Submit(reqs[i], [st, i](const GenerationEvent& ev) {
      absl::MutexLock lock(&st->mu);
      st->mu.Await(absl::Condition(&st->all_submitted));
      Outcome& o = st->out[i];
      if (st->done[i]) {
        ++o.events_after_done;
        return;
      }
      if (!ev.done) {
        o.tokens.push_back(ev.token);
        return;
      }
      o.finish_reason = ev.finish_reason;
      o.status = ev.status;
      o.logits = ev.logits;
      o.completion_tokens = ev.completion_tokens;
      st->done[i] = true;
      --st->remaining;
    });
    EXPECT_TRUE(s.ok()) << s;
    if (!s.ok()) {
      absl::MutexLock lock(&st->mu);
      st->done[i] = true;
      --st->remaining;
    }
  }
  absl::MutexLock lock(&st->mu);
  st->all_submitted = true;
  const bool finished =
      st->mu.AwaitWithTimeout(absl::Condition(
                                  +[](int* r) { return *r == 0; }, &st->remaining),
                              absl::Seconds(60));
  EXPECT_TRUE(finished) << "requests did not finish";
  return st->out;
}

// Greedy decoding by hand: prefill, then one token at a time.
std::vector<int32_t> ManualGreedy(Engine& e, const std::vector<int32_t>& prompt, int n) {
  auto seq = e.NewSequence();
  std::vector<int32_t> out;
  StepInput in{seq.get(), prompt, false};
  auto r = e.Step({&in, 1});
  EXPECT_TRUE(r.ok()) << r.status();
  if (!r.ok()) return out;
  for (int i = 0; i < n; ++i) {
    const Tensor& l = (*r)[0];
    const float* row = l.row(l.dim(0) - 1);
    const int32_t tok = static_cast<int32_t>(std::max_element(row, row + l.dim(1)) - row);
    out.push_back(tok);
    if (i + 1 == n) break;
    StepInput d{seq.get(), absl::MakeConstSpan(&out.back(), 1), false};
    r = e.Step({&d, 1});
    EXPECT_TRUE(r.ok()) << r.status();
    if (!r.ok()) return out;
  }
  return out;
}

TEST_F(EngineTest, SchedulerGreedyEqualsManualLoop) {
  const int n = 8;
  std::vector<GenerationRequest> reqs;
  std::vector<std::vector<int32_t>> expect;
  for (int i = 0; i < 4; ++i) {
    GenerationRequest r;
    r.prompt = Prompt(3 + 4 * i, 20 + i);  // 3, 7, 11, 15 tokens: chunked prefill below
    r.max_tokens = n;
    reqs.push_back(r);
    expect.push_back(ManualGreedy(engine(), r.prompt, n));
  }
  Scheduler sched(&engine(), SchedulerOptions{.max_step_tokens = 6, .max_running = 3});
  const std::vector<Outcome> got = RunAll(sched, reqs);
  for (size_t i = 0; i < reqs.size(); ++i) {
    EXPECT_EQ(got[i].tokens, expect[i]) << "request " << i;
    EXPECT_EQ(got[i].finish_reason, "length");
    EXPECT_TRUE(got[i].status.ok()) << got[i].status;
    EXPECT_EQ(got[i].completion_tokens, n);
    EXPECT_EQ(got[i].events_after_done, 0);
  }
  const SchedulerStats stats = sched.stats();
  EXPECT_GT(stats.max_batch_sequences, 1) << "requests should have shared steps";
  EXPECT_LE(stats.max_batch_sequences, 3);
}

TEST_F(EngineTest, SchedulerStopsOnStopToken) {
  const std::vector<int32_t> prompt = Prompt(5, 30);
  const std::vector<int32_t> greedy = ManualGreedy(engine(), prompt, 6);
  ASSERT_EQ(greedy.size(), 6u);
  const int32_t stop = greedy[3];
  const size_t first = std::find(greedy.begin(), greedy.end(), stop) - greedy.begin();
  Scheduler sched(&engine(), SchedulerOptions{});
  GenerationRequest r;
  r.prompt = prompt;
  r.max_tokens = 6;
  r.stop_tokens = {stop};
  const std::vector<Outcome> got = RunAll(sched, {r});
  EXPECT_EQ(got[0].finish_reason, "stop");
  EXPECT_EQ(got[0].tokens, std::vector<int32_t>(greedy.begin(), greedy.begin() + first + 1));
}

TEST_F(EngineTest, SchedulerScoreOnlyMatchesScore) {
  const std::vector<int32_t> prompt = Prompt(13, 31);
  auto full = engine().Score(prompt);
  ASSERT_TRUE(full.ok()) << full.status();
  Scheduler sched(&engine(), SchedulerOptions{.max_step_tokens = 5});
  GenerationRequest r;
  r.prompt = prompt;
  r.score_only = true;
  const std::vector<Outcome> got = RunAll(sched, {r});
  ASSERT_TRUE(got[0].status.ok()) << got[0].status;
  EXPECT_TRUE(got[0].tokens.empty());
  ASSERT_THAT(got[0].logits.shape(), ElementsAre(13, 96));
  EXPECT_LE(MaxAbsDiff(got[0].logits.data(), full->data(), full->numel()), 1e-4);
}

TEST_F(EngineTest, SamplingIsReproducibleAndSeedDependent) {
  Scheduler sched(&engine(), SchedulerOptions{});
  auto request = [](uint64_t seed) {
    GenerationRequest r;
    r.prompt = {10, 20, 30};
    r.max_tokens = 10;
    r.sampling = SamplingParams{.temperature = 1.5f, .top_k = 0, .top_p = 1.0f, .seed = seed};
    return r;
  };
  std::vector<GenerationRequest> reqs;
  for (uint64_t seed = 1; seed <= 6; ++seed) reqs.push_back(request(seed));
  reqs.push_back(request(1));  // a repeat of seed 1, batched with the others
  const std::vector<Outcome> got = RunAll(sched, reqs);
  const std::vector<Outcome> again = RunAll(sched, {request(3)});
  for (const Outcome& o : got) ASSERT_EQ(o.tokens.size(), 10u);
  EXPECT_EQ(got[6].tokens, got[0].tokens) << "same seed, same tokens";
  EXPECT_EQ(again[0].tokens, got[2].tokens) << "same seed, same tokens, different batch";
  std::set<std::vector<int32_t>> distinct;
  for (int i = 0; i < 6; ++i) distinct.insert(got[i].tokens);
  EXPECT_GT(distinct.size(), 1u) << "six seeds at temperature 1.5 all gave the same tokens";
}

TEST_F(EngineTest, SchedulerRejectsBadRequests) {
  Scheduler sched(&engine(), SchedulerOptions{});
  auto cb = [](const GenerationEvent&) {};
  GenerationRequest r;
  EXPECT_EQ(sched.Submit(r, cb).code(), absl::StatusCode::kInvalidArgument);  // empty prompt
  r.prompt = {1, 96};
  EXPECT_EQ(sched.Submit(r, cb).code(), absl::StatusCode::kInvalidArgument);
  r.prompt = {1, -3};
  EXPECT_EQ(sched.Submit(r, cb).code(), absl::StatusCode::kInvalidArgument);
  r.prompt = {1, 2};
  r.sampling.temperature = -1;
  EXPECT_EQ(sched.Submit(r, cb).code(), absl::StatusCode::kInvalidArgument);
  r.sampling.temperature = 0;
  r.max_tokens = 0;
  EXPECT_EQ(sched.Submit(r, cb).code(), absl::StatusCode::kInvalidArgument);
  sched.Stop();
  r.max_tokens = 1;
  EXPECT_EQ(sched.Submit(r, cb).code(), absl::StatusCode::kUnavailable);
}

}  // namespace
}  // namespace moemesh
