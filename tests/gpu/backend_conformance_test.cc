// Conformance of every ComputeBackend against the CPU backend, in the manner of ggml's
// test-backend-ops: each op runs on random inputs of several shapes (decode shapes with m = 1,
// grouped-query attention over a past context, qk_dim != v_dim, strided rows, both rotary
// layouts) on the backend under test and on the CPU reference, and the outputs must agree to
// kRelTol relative (against max(1, |reference|)).
//
// The suite is parameterised over backends. "cpu" tests a second CPU instance against the
// reference and demands bitwise equality: it checks that the harness itself (inputs, buffers,
// comparisons) is deterministic, and it always runs. "cuda" runs on device 0 and skips when
// the build has no CUDA or no GPU is visible.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <deque>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "services/compute/backend.h"
#include "tests/test_util.h"
#ifdef MOEMESH_HAVE_CUDA
#include "services/compute/cuda/cuda_backend.h"
#endif

namespace moemesh {
namespace {

using ::moemesh::testing::RandomFloats;

constexpr double kRelTol = 1e-4;
// What output buffers hold before a call: an element a backend fails to write stays far from
// any value the ops produce here. (Not NaN: BLAS may scale y by beta = 0, and NaN · 0 is NaN.)
constexpr float kUnset = 12345.0f;

class BackendConformanceTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    ref_ = MakeCpuBackend();
    if (GetParam() == "cpu") {
      be_ = MakeCpuBackend();
      tol_ = 0.0;
      return;
    }
    ASSERT_EQ(GetParam(), "cuda");
#ifdef MOEMESH_HAVE_CUDA
    if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device is visible";
    auto be = MakeCudaBackend(0);
    ASSERT_TRUE(be.ok()) << be.status();
    be_ = *std::move(be);
    ASSERT_EQ(be_->name(), "cuda");
#else
    GTEST_SKIP() << "built without CUDA";
#endif
  }

  // A buffer that lives as long as the test. Backends may cache weights by host address, so
  // no buffer handed to a backend may be freed and its address reused while the backend lives.
  std::vector<float>& Keep(std::vector<float> v) {
    arena_.push_back(std::move(v));
    return arena_.back();
  }
  std::vector<float>& Random(size_t n, float scale = 1.0f) {
    return Keep(RandomFloats(n, next_seed_++, scale));
  }
  std::vector<float>& Filled(size_t n, float value) { return Keep(std::vector<float>(n, value)); }

  // Every element within tol_ of the reference, relative to max(1, |want|); NaN never is.
  ::testing::AssertionResult Close(const float* got, const float* want, size_t n) const {
    double worst = 0;
    size_t at = 0;
    for (size_t i = 0; i < n; ++i) {
      const double err = std::fabs(static_cast<double>(got[i]) - want[i]) /
                         std::max(1.0, std::fabs(static_cast<double>(want[i])));
      if (std::isnan(err) || std::isnan(got[i]) != std::isnan(want[i])) {
        return ::testing::AssertionFailure()
               << "element " << i << " of " << n << ": got " << got[i] << ", want " << want[i];
      }
      if (err > worst) {
        worst = err;
        at = i;
      }
    }
    if (worst > tol_) {
      return ::testing::AssertionFailure()
             << "element " << at << " of " << n << ": got " << got[at] << ", want " << want[at]
             << " (relative error " << worst << " > " << tol_ << ")";
    }
    return ::testing::AssertionSuccess();
  }
  ::testing::AssertionResult Close(const std::vector<float>& got,
                                   const std::vector<float>& want) const {
    if (got.size() != want.size()) {
      return ::testing::AssertionFailure() << "sizes " << got.size() << " vs " << want.size();
    }
    return Close(got.data(), want.data(), got.size());
  }

  std::unique_ptr<ComputeBackend> ref_;  // the CPU backend
  std::unique_ptr<ComputeBackend> be_;   // the backend under test
  double tol_ = kRelTol;

 private:
  std::deque<std::vector<float>> arena_;  // a deque: elements never move
  uint64_t next_seed_ = 1;
};

// ---- MatMulT ------------------------------------------------------------------------------

struct MatMulShape {
  int64_t m, k, n;
};

TEST_P(BackendConformanceTest, MatMulT) {
  const MatMulShape shapes[] = {{1, 64, 32},    {1, 1024, 512}, {3, 17, 5},
                                {16, 256, 512}, {97, 384, 257}, {128, 1024, 128}};
  for (const MatMulShape& s : shapes) {
    SCOPED_TRACE(absl::StrCat("m=", s.m, " k=", s.k, " n=", s.n));
    const auto& x = Random(s.m * s.k);
    const auto& w = Random(s.n * s.k, 1.0f / std::sqrt(static_cast<float>(s.k)));
    auto& want = Filled(s.m * s.n, kUnset);
    auto& got = Filled(s.m * s.n, kUnset);
    ref_->MatMulT(x.data(), s.m, s.k, w.data(), s.n, want.data());
    be_->MatMulT(x.data(), s.m, s.k, w.data(), s.n, got.data());
    EXPECT_TRUE(Close(got, want));
  }
}

TEST_P(BackendConformanceTest, MatMulTAccumulate) {
  const MatMulShape shapes[] = {{1, 64, 32}, {9, 128, 64}, {40, 96, 200}};
  for (const MatMulShape& s : shapes) {
    SCOPED_TRACE(absl::StrCat("m=", s.m, " k=", s.k, " n=", s.n));
    const auto& x = Random(s.m * s.k);
    const auto& w = Random(s.n * s.k, 1.0f / std::sqrt(static_cast<float>(s.k)));
    const auto& y0 = Random(s.m * s.n, 2.0f);
    auto& want = Keep(y0);
    auto& got = Keep(y0);
    ref_->MatMulT(x.data(), s.m, s.k, w.data(), s.n, want.data(), /*accumulate=*/true);
    be_->MatMulT(x.data(), s.m, s.k, w.data(), s.n, got.data(), /*accumulate=*/true);
    EXPECT_TRUE(Close(got, want));
  }
}

// One weight used whole, as its first rows (same address, fewer bytes) and as its last rows
// (another address), with several inputs each: a weight cache must key on address and size.
TEST_P(BackendConformanceTest, MatMulTWeightViewsAndReuse) {
  const int64_t k = 96, rows = 64;
  const auto& w = Random(rows * k, 0.1f);
  struct View {
    const float* w;
    int64_t n;
  };
  const View views[] = {{w.data(), rows},
                        {w.data(), rows / 2},
                        {w.data() + (rows / 2) * k, rows / 2},
                        {w.data(), rows}};
  for (int64_t m : {1, 7, 1, 33}) {
    for (const View& v : views) {
      SCOPED_TRACE(absl::StrCat("m=", m, " offset=", (v.w - w.data()) / k, " n=", v.n));
      const auto& x = Random(m * k);
      auto& want = Filled(m * v.n, kUnset);
      auto& got = Filled(m * v.n, kUnset);
      ref_->MatMulT(x.data(), m, k, v.w, v.n, want.data());
      be_->MatMulT(x.data(), m, k, v.w, v.n, got.data());
      EXPECT_TRUE(Close(got, want));
    }
  }
}

// ---- RmsNorm ------------------------------------------------------------------------------

TEST_P(BackendConformanceTest, RmsNorm) {
  struct Shape {
    int64_t rows, dim;
    float eps;
  };
  const Shape shapes[] = {{1, 64, 1e-6f}, {4, 4096, 1e-5f}, {33, 1000, 1e-6f}, {7, 5, 1e-5f}};
  for (const Shape& s : shapes) {
    SCOPED_TRACE(absl::StrCat("rows=", s.rows, " dim=", s.dim));
    const auto& x = Random(s.rows * s.dim, 3.0f);
    const auto& weight = Random(s.dim, 2.0f);
    auto& want = Filled(s.rows * s.dim, kUnset);
    auto& got = Filled(s.rows * s.dim, kUnset);
    ref_->RmsNorm(x.data(), weight.data(), s.rows, s.dim, s.eps, want.data());
    be_->RmsNorm(x.data(), weight.data(), s.rows, s.dim, s.eps, got.data());
    EXPECT_TRUE(Close(got, want));
    // In place (y aliases x), as the engine calls it.
    auto& want_in_place = Keep(x);
    auto& got_in_place = Keep(x);
    ref_->RmsNorm(want_in_place.data(), weight.data(), s.rows, s.dim, s.eps, want_in_place.data());
    be_->RmsNorm(got_in_place.data(), weight.data(), s.rows, s.dim, s.eps, got_in_place.data());
    EXPECT_TRUE(Close(got_in_place, want_in_place));
  }
}

// ---- Rope ---------------------------------------------------------------------------------

struct RopeCase {
  std::string name;
  int64_t tokens, heads, head_dim;
  int64_t row;     // floats per token row of the buffer
  int64_t offset;  // where x starts within a row
  int64_t rot_dim;
  bool interleaved;
  float mscale;
};

TEST_P(BackendConformanceTest, Rope) {
  const RopeCase cases[] = {
      // Mixtral q and k: rotate_half over whole heads.
      {"q_rotate_half", 5, 8, 64, 8 * 64, 0, 64, false, 1.0f},
      {"k_decode", 1, 2, 128, 2 * 128, 0, 128, false, 1.0f},
      // Partial rotary dims, with rows padded beyond the heads.
      {"partial_rot", 6, 3, 64, 3 * 64 + 10, 0, 32, false, 1.0f},
      // DeepSeek q_pe: the last 16 of each 48+16 head, adjacent pairs, YaRN mscale. The last
      // head's rotated dims end exactly at the end of the buffer.
      {"deepseek_q_pe", 7, 4, 64, 4 * 64, 48, 16, true, 1.3f},
      // DeepSeek k_pe: one head at the tail of each [kv_lora | rope] cache row.
      {"deepseek_k_pe", 7, 1, 80, 80, 64, 16, true, 1.3f},
      {"interleaved_decode", 1, 16, 64, 16 * 64, 0, 64, true, 1.0f},
  };
  constexpr int64_t kGuard = 32;  // floats after the buffer that no backend may touch
  for (const RopeCase& c : cases) {
    SCOPED_TRACE(c.name);
    const int64_t half = c.rot_dim / 2;
    std::vector<float>& inv_freq = Keep(std::vector<float>(half));
    for (int64_t i = 0; i < half; ++i) {
      inv_freq[i] = static_cast<float>(std::pow(10000.0, -2.0 * i / c.rot_dim));
    }
    std::vector<int32_t> positions(c.tokens);
    const auto& r = Random(c.tokens);
    for (int64_t t = 0; t < c.tokens; ++t) {
      positions[t] = static_cast<int32_t>(std::fabs(r[t]) * 8000);  // up to long contexts
    }
    if (c.tokens == 1) positions[0] = 4095;
    const size_t n = c.tokens * c.row + kGuard;
    auto& want = Random(n);
    auto& got = Keep(want);
    ref_->Rope(want.data() + c.offset, c.tokens, c.heads, c.head_dim, c.row, c.rot_dim,
               positions.data(), inv_freq.data(), c.mscale, c.interleaved);
    be_->Rope(got.data() + c.offset, c.tokens, c.heads, c.head_dim, c.row, c.rot_dim,
              positions.data(), inv_freq.data(), c.mscale, c.interleaved);
    // The whole buffer: rotated dims, dims left alone, and the guard past the end.
    EXPECT_TRUE(Close(got, want));
    EXPECT_EQ(std::memcmp(got.data() + n - kGuard, want.data() + n - kGuard, kGuard * 4), 0);
  }
}

// ---- SiluMul ------------------------------------------------------------------------------

TEST_P(BackendConformanceTest, SiluMul) {
  for (int64_t n : {1, 1000, 100003}) {
    SCOPED_TRACE(absl::StrCat("n=", n));
    const auto& gate = Random(n, 12.0f);  // reaches both tails of the sigmoid
    const auto& up = Random(n, 2.0f);
    auto& want = Filled(n, kUnset);
    auto& got = Filled(n, kUnset);
    ref_->SiluMul(gate.data(), up.data(), n, want.data());
    be_->SiluMul(gate.data(), up.data(), n, got.data());
    EXPECT_TRUE(Close(got, want));
    // out aliasing gate, as ExpertFfn does.
    auto& want_in_place = Keep(gate);
    auto& got_in_place = Keep(gate);
    ref_->SiluMul(want_in_place.data(), up.data(), n, want_in_place.data());
    be_->SiluMul(got_in_place.data(), up.data(), n, got_in_place.data());
    EXPECT_TRUE(Close(got_in_place, want_in_place));
  }
}

// ---- CausalAttention ----------------------------------------------------------------------

struct AttentionCase {
  std::string name;
  int64_t num_new, ctx, heads, kv_heads, qk_dim, v_dim;
  int64_t q_pad = 0, k_pad = 0, v_pad = 0;  // extra floats per row beyond the packed width
  bool latent = false;  // MLA: one cache whose rows are [v_dim values | rest], k = v = cache
};

TEST_P(BackendConformanceTest, CausalAttention) {
  const AttentionCase cases[] = {
      {"prefill_mha", 16, 16, 4, 4, 64, 64},
      {"decode_gqa_with_past", 1, 300, 8, 2, 64, 64},
      {"chunk_gqa_with_past", 7, 50, 8, 4, 32, 32},
      {"prefill_chunk_many_tiles", 130, 200, 2, 2, 64, 64},
      {"decode_long_context", 1, 3000, 2, 1, 128, 128},
      {"qk_dim_ne_v_dim", 5, 33, 6, 3, 48, 80},
      {"strided_rows", 5, 20, 4, 2, 16, 24, 8, 5, 3},
      {"latent_mqa_decode", 1, 77, 4, 1, 80, 64, 0, 0, 0, true},
      {"latent_mqa_prefill", 9, 9, 4, 1, 80, 64, 0, 0, 0, true},
      {"single_key", 1, 1, 2, 1, 8, 8},
  };
  for (const AttentionCase& c : cases) {
    SCOPED_TRACE(c.name);
    AttentionShape s;
    s.num_new = c.num_new;
    s.ctx = c.ctx;
    s.heads = c.heads;
    s.kv_heads = c.kv_heads;
    s.qk_dim = c.qk_dim;
    s.v_dim = c.v_dim;
    s.q_stride = c.heads * c.qk_dim + c.q_pad;
    s.scale = 1.0f / std::sqrt(static_cast<float>(c.qk_dim));
    const auto& q = Random(c.num_new * s.q_stride);
    const float* k;
    const float* v;
    if (c.latent) {
      s.k_stride = s.v_stride = c.qk_dim;  // values are the first v_dim floats of each row
      const auto& cache = Random(c.ctx * c.qk_dim);
      k = v = cache.data();
    } else {
      s.k_stride = c.kv_heads * c.qk_dim + c.k_pad;
      s.v_stride = c.kv_heads * c.v_dim + c.v_pad;
      k = Random(c.ctx * s.k_stride).data();
      v = Random(c.ctx * s.v_stride).data();
    }
    const size_t n = c.num_new * c.heads * c.v_dim;
    auto& want = Filled(n, kUnset);
    auto& got = Filled(n, kUnset);
    ref_->CausalAttention(s, q.data(), k, v, want.data());
    be_->CausalAttention(s, q.data(), k, v, got.data());
    EXPECT_TRUE(Close(got, want));
  }
}

// ---- ExpertFfn ----------------------------------------------------------------------------

TEST_P(BackendConformanceTest, ExpertFfn) {
  struct Shape {
    int64_t m, hidden, inter;
  };
  const Shape shapes[] = {
      {1, 64, 128}, {5, 256, 512}, {64, 512, 1408}, {1, 1024, 2816}, {33, 1024, 704}};
  for (const Shape& s : shapes) {
    SCOPED_TRACE(absl::StrCat("m=", s.m, " hidden=", s.hidden, " inter=", s.inter));
    const auto& w1 = Random(s.inter * s.hidden, 1.0f / std::sqrt(static_cast<float>(s.hidden)));
    const auto& w3 = Random(s.inter * s.hidden, 1.0f / std::sqrt(static_cast<float>(s.hidden)));
    const auto& w2 = Random(s.hidden * s.inter, 1.0f / std::sqrt(static_cast<float>(s.inter)));
    // The same expert with shrinking and growing batches: cached weights, regrown scratch.
    for (int64_t m : {s.m, int64_t{1}, s.m + 16}) {
      const auto& x = Random(m * s.hidden, 2.0f);
      auto& work = Filled(2 * m * s.inter, kUnset);
      auto& want = Filled(m * s.hidden, kUnset);
      auto& got = Filled(m * s.hidden, kUnset);
      ref_->ExpertFfn(x.data(), m, s.hidden, s.inter, w1.data(), w3.data(), w2.data(), work.data(),
                      want.data());
      be_->ExpertFfn(x.data(), m, s.hidden, s.inter, w1.data(), w3.data(), w2.data(), work.data(),
                     got.data());
      EXPECT_TRUE(Close(got, want)) << "batch of " << m;
    }
  }
}

// The worker's compute threads share one backend: concurrent calls must each get their own
// answer.
TEST_P(BackendConformanceTest, ConcurrentExpertFfn) {
  constexpr int kThreads = 4, kIterations = 6;
  const int64_t hidden = 256, inter = 384;
  struct Job {
    const std::vector<float>*x, *w1, *w3, *w2;
    int64_t m;
    std::vector<float>* want;
    std::vector<float>* got[kIterations];
  };
  std::vector<Job> jobs(kThreads);
  for (int t = 0; t < kThreads; ++t) {
    Job& j = jobs[t];
    j.m = 1 + 5 * t;
    j.x = &Random(j.m * hidden);
    j.w1 = &Random(inter * hidden, 0.0625f);
    j.w3 = &Random(inter * hidden, 0.0625f);
    j.w2 = &Random(hidden * inter, 0.05f);
    j.want = &Filled(j.m * hidden, kUnset);
    for (auto& g : j.got) g = &Filled(j.m * hidden, kUnset);
    std::vector<float>& work = Filled(2 * j.m * inter, 0.0f);
    ref_->ExpertFfn(j.x->data(), j.m, hidden, inter, j.w1->data(), j.w3->data(), j.w2->data(),
                    work.data(), j.want->data());
  }
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      Job& j = jobs[t];
      std::vector<float> work(2 * j.m * inter);
      for (int it = 0; it < kIterations; ++it) {
        be_->ExpertFfn(j.x->data(), j.m, hidden, inter, j.w1->data(), j.w3->data(), j.w2->data(),
                       work.data(), j.got[it]->data());
      }
    });
  }
  for (auto& th : threads) th.join();
  for (int t = 0; t < kThreads; ++t) {
    for (int it = 0; it < kIterations; ++it) {
      EXPECT_TRUE(Close(*jobs[t].got[it], *jobs[t].want)) << "thread " << t << " call " << it;
    }
  }
}

// ---- SoftmaxTopK --------------------------------------------------------------------------

TEST_P(BackendConformanceTest, SoftmaxTopK) {
  struct Shape {
    int64_t t, e;
    int k;
    bool renormalize;
  };
  const Shape shapes[] = {{1, 8, 2, true}, {33, 64, 6, true}, {16, 8, 2, false}, {4, 160, 8, true}};
  for (const Shape& s : shapes) {
    SCOPED_TRACE(absl::StrCat("t=", s.t, " e=", s.e, " k=", s.k));
    std::vector<float> logits = Random(s.t * s.e, 4.0f);
    // Ties, which must break towards the lower expert id: a row of equal logits, and a row
    // whose best values repeat.
    std::fill(logits.begin(), logits.begin() + s.e, 0.5f);
    if (s.t > 1) {
      for (int64_t i = 0; i < s.e; i += 3) logits[s.e + i] = 7.0f;
    }
    std::vector<int32_t> want_ids(s.t * s.k, -1), got_ids(s.t * s.k, -1);
    auto& want = Filled(s.t * s.k, kUnset);
    auto& got = Filled(s.t * s.k, kUnset);
    ref_->SoftmaxTopK(logits.data(), s.t, s.e, s.k, s.renormalize, want_ids.data(), want.data());
    be_->SoftmaxTopK(logits.data(), s.t, s.e, s.k, s.renormalize, got_ids.data(), got.data());
    EXPECT_EQ(got_ids, want_ids);
    EXPECT_TRUE(Close(got, want));
  }
}

INSTANTIATE_TEST_SUITE_P(Backends, BackendConformanceTest, ::testing::Values("cpu", "cuda"),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           return info.param;
                         });

// ---- the CUDA factory ---------------------------------------------------------------------

// Runs wherever the build has CUDA, GPU or not: asking for a device that is not there is a
// Status, never a crash.
TEST(CudaBackendFactory, MissingDevicesAreErrors) {
#ifndef MOEMESH_HAVE_CUDA
  GTEST_SKIP() << "built without CUDA";
#else
  const int count = CudaDeviceCount();
  EXPECT_GE(count, 0);
  EXPECT_FALSE(MakeCudaBackend(-1).ok());
  const auto past = MakeCudaBackend(count);
  ASSERT_FALSE(past.ok());
  EXPECT_EQ(past.status().code(),
            count == 0 ? absl::StatusCode::kFailedPrecondition : absl::StatusCode::kInvalidArgument)
      << past.status();
  EXPECT_EQ(CudaDeviceName(count), "");
  if (count > 0) {
    EXPECT_FALSE(CudaDeviceName(0).empty());
    auto be = MakeCudaBackend(count - 1);
    ASSERT_TRUE(be.ok()) << be.status();
    EXPECT_EQ((*be)->name(), "cuda");
  }
#endif
}

}  // namespace
}  // namespace moemesh
