// The CPU backend against values worked out by hand (or by plain loops over the defining
// formulas, written here independently of the backend), and the DeepSeek-V3 sigmoid
// group-limited gating against golden cases.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <memory>
#include <utility>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "services/compute/backend.h"
#include "services/moe/gating.h"
#include "tests/test_util.h"

namespace moemesh {
namespace {

using ::moemesh::testing::RandomFloats;
using ::testing::ElementsAre;
using ::testing::FloatNear;
using ::testing::Pointwise;

class CpuKernelsTest : public ::testing::Test {
 protected:
  std::unique_ptr<ComputeBackend> be_ = MakeCpuBackend();
};

// ---- MatMulT ----------------------------------------------------------------------------

TEST_F(CpuKernelsTest, MatMulT2x3) {
  EXPECT_EQ(be_->name(), "cpu");
  const float x[6] = {1, 2, 3,   //
                      4, 5, 6};  // [2, 3]
  const float w[6] = {1, 0, -1,  //
                      2, 1, 0};  // [2, 3]
  float y[4] = {99, 99, 99, 99};
  be_->MatMulT(x, 2, 3, w, 2, y);
  // y = x · wᵀ: [1-3, 2+2; 4-6, 8+5].
  EXPECT_THAT(y, ElementsAre(-2, 4, -2, 13));
  // Accumulate adds to what is there.
  float acc[4] = {1, 1, 10, -10};
  be_->MatMulT(x, 2, 3, w, 2, acc, /*accumulate=*/true);
  EXPECT_THAT(acc, ElementsAre(-1, 5, 8, 3));
}

TEST_F(CpuKernelsTest, MatMulTSingleRow) {
  // m = 1 goes down a different (matrix-vector) path.
  const float x[3] = {1, 2, 3};
  const float w[9] = {1, 0, -1, 2, 1, 0, 0, 0, 1};  // [3, 3]
  float y[3] = {7, 7, 7};
  be_->MatMulT(x, 1, 3, w, 3, y);
  EXPECT_THAT(y, ElementsAre(-2, 4, 3));
  be_->MatMulT(x, 1, 3, w, 3, y, /*accumulate=*/true);
  EXPECT_THAT(y, ElementsAre(-4, 8, 6));
}

TEST_F(CpuKernelsTest, MatMulTMatchesLoops) {
  const int64_t m = 5, k = 7, n = 3;
  const std::vector<float> x = RandomFloats(m * k, 1), w = RandomFloats(n * k, 2);
  std::vector<float> y(m * n);
  be_->MatMulT(x.data(), m, k, w.data(), n, y.data());
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double s = 0;
      for (int64_t p = 0; p < k; ++p) s += double(x[i * k + p]) * w[j * k + p];
      EXPECT_NEAR(y[i * n + j], s, 1e-5) << i << "," << j;
    }
  }
}

// ---- RmsNorm ----------------------------------------------------------------------------

TEST_F(CpuKernelsTest, RmsNorm) {
  // Row 0: [3, 4]: mean square 12.5. Row 1: [1, 1] with eps 0: rms 1.
  const float x[4] = {3, 4, 1, 1};
  const float weight[2] = {1, 2};
  float y[4];
  be_->RmsNorm(x, weight, 2, 2, 0.0f, y);
  const float r = std::sqrt(12.5f);
  EXPECT_FLOAT_EQ(y[0], 3 / r);
  EXPECT_FLOAT_EQ(y[1], 2 * 4 / r);
  EXPECT_FLOAT_EQ(y[2], 1);
  EXPECT_FLOAT_EQ(y[3], 2);
}

TEST_F(CpuKernelsTest, RmsNormEpsAndAliasing) {
  // mean(x²) = 1 and eps = 3: every value is divided by sqrt(4) = 2.
  float x[4] = {1, -1, 1, -1};
  const float weight[4] = {1, 2, 3, 4};
  be_->RmsNorm(x, weight, 1, 4, 3.0f, x);  // in place
  EXPECT_THAT(x, Pointwise(FloatNear(1e-6), std::vector<float>{0.5f, -1.0f, 1.5f, -2.0f}));
  // All zeros with eps > 0 stays zero (no NaN).
  float z[3] = {0, 0, 0};
  be_->RmsNorm(z, weight, 1, 3, 1e-5f, z);
  EXPECT_THAT(z, ElementsAre(0, 0, 0));
}

// ---- Rope -------------------------------------------------------------------------------

TEST_F(CpuKernelsTest, RopeRotateHalfAtPositionOne) {
  // head_dim 4, two frequencies 1 and 0.5; at position 1 the angles are 1 and 0.5.
  const float inv_freq[2] = {1.0f, 0.5f};
  const int32_t pos[1] = {1};
  float x[4] = {1, 2, 3, 4};
  be_->Rope(x, 1, 1, 4, 4, 4, pos, inv_freq, 1.0f, /*interleaved=*/false);
  // HF rotate_half: x*cos + cat(-x2, x1)*sin with pairs (0, 2) and (1, 3).
  const double c1 = std::cos(1.0), s1 = std::sin(1.0), c5 = std::cos(0.5), s5 = std::sin(0.5);
  EXPECT_NEAR(x[0], 1 * c1 - 3 * s1, 1e-6);
  EXPECT_NEAR(x[1], 2 * c5 - 4 * s5, 1e-6);
  EXPECT_NEAR(x[2], 3 * c1 + 1 * s1, 1e-6);
  EXPECT_NEAR(x[3], 4 * c5 + 2 * s5, 1e-6);
}

TEST_F(CpuKernelsTest, RopeInterleavedAtPositionOne) {
  const float inv_freq[2] = {1.0f, 0.5f};
  const int32_t pos[1] = {1};
  float x[4] = {1, 2, 3, 4};
  be_->Rope(x, 1, 1, 4, 4, 4, pos, inv_freq, 1.0f, /*interleaved=*/true);
  // DeepSeek: complex pairs (0, 1) and (2, 3), i.e. (x0 + i x1) * e^{i θ}.
  const double c1 = std::cos(1.0), s1 = std::sin(1.0), c5 = std::cos(0.5), s5 = std::sin(0.5);
  EXPECT_NEAR(x[0], 1 * c1 - 2 * s1, 1e-6);
  EXPECT_NEAR(x[1], 2 * c1 + 1 * s1, 1e-6);
  EXPECT_NEAR(x[2], 3 * c5 - 4 * s5, 1e-6);
  EXPECT_NEAR(x[3], 4 * c5 + 3 * s5, 1e-6);
}

TEST_F(CpuKernelsTest, RopePositionsHeadsStrideRotDimMscale) {
  // Two tokens at positions 0 and 3, two heads of 6 dims of which 4 rotate, rows padded to
  // 14 floats; mscale 2. Position 0 is the identity (times mscale); dims 4, 5 and the padding
  // are untouched.
  const float inv_freq[2] = {0.25f, 0.1f};
  const int32_t pos[2] = {0, 3};
  const int64_t stride = 14;
  std::vector<float> x = RandomFloats(2 * stride, 5);
  const std::vector<float> x0 = x;
  be_->Rope(x.data(), 2, 2, 6, stride, 4, pos, inv_freq, 2.0f, /*interleaved=*/false);
  for (int t = 0; t < 2; ++t) {
    for (int h = 0; h < 2; ++h) {
      const float* a = x0.data() + t * stride + h * 6;
      const float* b = x.data() + t * stride + h * 6;
      for (int i = 0; i < 2; ++i) {
        const double th = pos[t] * double(inv_freq[i]);
        const double c = 2 * std::cos(th), s = 2 * std::sin(th);
        EXPECT_NEAR(b[i], a[i] * c - a[i + 2] * s, 1e-5) << t << h << i;
        EXPECT_NEAR(b[i + 2], a[i + 2] * c + a[i] * s, 1e-5) << t << h << i;
      }
      EXPECT_EQ(b[4], a[4]);
      EXPECT_EQ(b[5], a[5]);
    }
    EXPECT_EQ(x[t * stride + 12], x0[t * stride + 12]);
    EXPECT_EQ(x[t * stride + 13], x0[t * stride + 13]);
  }
  // Position 0 with mscale 2 just doubles the rotated dims.
  EXPECT_NEAR(x[0], 2 * x0[0], 1e-6);
}

// ---- CausalAttention ----------------------------------------------------------------------

// A shape with densely packed rows; tests that want padding widen the strides afterwards.
AttentionShape Dense(int64_t num_new, int64_t ctx, int64_t heads, int64_t kv_heads, int64_t qk_dim,
                     int64_t v_dim, float scale) {
  AttentionShape s;
  s.num_new = num_new;
  s.ctx = ctx;
  s.heads = heads;
  s.kv_heads = kv_heads;
  s.qk_dim = qk_dim;
  s.v_dim = v_dim;
  s.q_stride = heads * qk_dim;
  s.k_stride = kv_heads * qk_dim;
  s.v_stride = kv_heads * v_dim;
  s.scale = scale;
  return s;
}

// Plain-loop causal attention, written from the definition.
std::vector<float> NaiveAttention(const AttentionShape& s, const std::vector<float>& q,
                                  const std::vector<float>& k, const std::vector<float>& v) {
  std::vector<float> out(s.num_new * s.heads * s.v_dim, 0.0f);
  const int64_t rep = s.heads / s.kv_heads;
  for (int64_t i = 0; i < s.num_new; ++i) {
    const int64_t pos = s.ctx - s.num_new + i;
    for (int64_t h = 0; h < s.heads; ++h) {
      const int64_t g = h / rep;  // HF repeat_kv: query head h reads kv head h / rep
      std::vector<double> w(pos + 1);
      double mx = -1e300;
      for (int64_t j = 0; j <= pos; ++j) {
        double d = 0;
        for (int64_t c = 0; c < s.qk_dim; ++c) {
          d += double(q[i * s.q_stride + h * s.qk_dim + c]) * k[j * s.k_stride + g * s.qk_dim + c];
        }
        w[j] = d * s.scale;
        mx = std::max(mx, w[j]);
      }
      double sum = 0;
      for (double& x : w) sum += (x = std::exp(x - mx));
      for (int64_t c = 0; c < s.v_dim; ++c) {
        double acc = 0;
        for (int64_t j = 0; j <= pos; ++j) acc += w[j] / sum * v[j * s.v_stride + g * s.v_dim + c];
        out[(i * s.heads + h) * s.v_dim + c] = static_cast<float>(acc);
      }
    }
  }
  return out;
}

TEST_F(CpuKernelsTest, AttentionWithZeroQueryAveragesVisibleValues) {
  // q = 0 makes every visible score equal, so each row is the mean of the values it sees:
  // the first new token (position 1) sees rows 0, 1; the second (position 2) sees 0, 1, 2.
  AttentionShape s = Dense(/*num_new=*/2, /*ctx=*/3, /*heads=*/1, /*kv_heads=*/1,
                           /*qk_dim=*/2, /*v_dim=*/2, /*scale=*/1.0f);
  const float q[4] = {0, 0, 0, 0};
  const float k[6] = {1, 2, 3, 4, 5, 6};
  const float v[6] = {1, 10, 3, 20, 8, 90};
  float out[4];
  be_->CausalAttention(s, q, k, v, out);
  EXPECT_NEAR(out[0], (1 + 3) / 2.0, 1e-6);
  EXPECT_NEAR(out[1], (10 + 20) / 2.0, 1e-6);
  EXPECT_NEAR(out[2], (1 + 3 + 8) / 3.0, 1e-6);
  EXPECT_NEAR(out[3], (10 + 20 + 90) / 3.0, 1e-6);
}

TEST_F(CpuKernelsTest, AttentionOneHeadHandComputed) {
  // One past token plus two new ones; 1-dim keys so the softmax is easy to write down.
  AttentionShape s = Dense(/*num_new=*/2, /*ctx=*/3, /*heads=*/1, /*kv_heads=*/1,
                           /*qk_dim=*/1, /*v_dim=*/1, /*scale=*/0.5f);
  const float q[2] = {2, 1};
  const float k[3] = {1, 0, 2};
  const float v[3] = {10, 20, 30};
  float out[2];
  be_->CausalAttention(s, q, k, v, out);
  // Row 0 (pos 1): scores 0.5*2*[1, 0] = [1, 0] -> weights e/(e+1), 1/(e+1).
  const double e = std::exp(1.0);
  EXPECT_NEAR(out[0], (10 * e + 20) / (e + 1), 1e-5);
  // Row 1 (pos 2): scores 0.5*1*[1, 0, 2] = [0.5, 0, 1].
  const double a = std::exp(0.5), b = 1.0, c = std::exp(1.0);
  EXPECT_NEAR(out[1], (10 * a + 20 * b + 30 * c) / (a + b + c), 1e-5);
}

TEST_F(CpuKernelsTest, AttentionOneHeadMatchesLoops) {
  AttentionShape s = Dense(/*num_new=*/2, /*ctx=*/3, /*heads=*/1, /*kv_heads=*/1,
                           /*qk_dim=*/4, /*v_dim=*/3, /*scale=*/0.5f);
  const auto q = RandomFloats(2 * 4, 11, 2.0f), k = RandomFloats(3 * 4, 12, 2.0f),
             v = RandomFloats(3 * 3, 13);
  std::vector<float> out(2 * 3);
  be_->CausalAttention(s, q.data(), k.data(), v.data(), out.data());
  EXPECT_THAT(out, Pointwise(FloatNear(1e-5), NaiveAttention(s, q, k, v)));
}

TEST_F(CpuKernelsTest, AttentionGqaWithPaddedStrides) {
  // 4 query heads over 2 kv heads; q rows and cache rows carry padding the kernel must skip.
  AttentionShape s = Dense(/*num_new=*/2, /*ctx=*/3, /*heads=*/4, /*kv_heads=*/2,
                           /*qk_dim=*/3, /*v_dim=*/2, /*scale=*/1.0f / std::sqrt(3.0f));
  s.q_stride += 5;
  s.k_stride += 1;
  s.v_stride += 3;
  const auto q = RandomFloats(2 * s.q_stride, 21, 2.0f), k = RandomFloats(3 * s.k_stride, 22, 2.0f),
             v = RandomFloats(3 * s.v_stride, 23);
  std::vector<float> out(2 * 4 * 2);
  be_->CausalAttention(s, q.data(), k.data(), v.data(), out.data());
  const std::vector<float> expect = NaiveAttention(s, q, k, v);
  EXPECT_THAT(out, Pointwise(FloatNear(1e-5), expect));
  // The kv-head mapping matters: heads 0, 1 share kv head 0 and heads 2, 3 kv head 1, so
  // pretending every head reads kv head 0 must give a different answer.
  AttentionShape wrong = s;
  wrong.kv_heads = 1;
  EXPECT_THAT(NaiveAttention(wrong, q, k, v), ::testing::Not(Pointwise(FloatNear(1e-3), expect)));
}

TEST_F(CpuKernelsTest, AttentionSingleNewTokenDecode) {
  // num_new = 1 takes the matrix-vector path; the one query sees the whole cache.
  AttentionShape s = Dense(/*num_new=*/1, /*ctx=*/4, /*heads=*/2, /*kv_heads=*/1,
                           /*qk_dim=*/2, /*v_dim=*/3, /*scale=*/0.7f);
  const auto q = RandomFloats(4, 31, 2.0f), k = RandomFloats(4 * 2, 32, 2.0f),
             v = RandomFloats(4 * 3, 33);
  std::vector<float> out(2 * 3);
  be_->CausalAttention(s, q.data(), k.data(), v.data(), out.data());
  EXPECT_THAT(out, Pointwise(FloatNear(1e-5), NaiveAttention(s, q, k, v)));
}

// The batched units (a grouped-query group's heads at one position; without groups, blocks of
// 4 positions of one head, the last one partial) over many shapes: against the plain loops, and
// bitwise the same rows when the cache is read in place in blocks (a paged cache) and when the
// new tokens come in two calls split anywhere (so a row's output depends neither on the block
// it lands in nor on the chunk).
TEST_F(CpuKernelsTest, AttentionMatchesLoopsOverShapesAndIgnoresChunking) {
  struct Heads {
    int64_t heads, kv_heads;
  };
  int seed = 100;
  for (Heads hk : {Heads{1, 1}, Heads{3, 3}, Heads{4, 2}, Heads{8, 1}, Heads{6, 2}}) {
    for (int64_t num_new : {1, 3, 4, 5, 9}) {
      for (int64_t qk_dim : {5, 64, 130}) {
        const int64_t past = seed % 7, ctx = past + num_new, v_dim = qk_dim == 5 ? 3 : 64;
        AttentionShape s = Dense(num_new, ctx, hk.heads, hk.kv_heads, qk_dim, v_dim,
                                 1.0f / std::sqrt(static_cast<float>(qk_dim)));
        s.q_stride += 3;
        s.k_stride += 1;
        s.v_stride += 2;
        const auto q = RandomFloats(num_new * s.q_stride, ++seed, 2.0f),
                   k = RandomFloats(ctx * s.k_stride, ++seed, 2.0f),
                   v = RandomFloats(ctx * s.v_stride, ++seed);
        const int64_t row = hk.heads * v_dim;
        std::vector<float> out(num_new * row);
        be_->CausalAttention(s, q.data(), k.data(), v.data(), out.data());
        EXPECT_THAT(out, Pointwise(FloatNear(2e-5), NaiveAttention(s, q, k, v)))
            << "heads " << hk.heads << "/" << hk.kv_heads << " num_new " << num_new << " qk "
            << qk_dim;
        // The same cache in blocks of 1, 3 or 16 rows, each its own allocation (a paged cache
        // read in place): bitwise the same rows.
        for (int64_t block : {1, 3, 16}) {
          // Each block holds its key rows, then its value rows (v_offset past the keys).
          std::vector<std::vector<float>> blocks;
          std::vector<const float*> seg;
          for (int64_t j0 = 0; j0 < ctx; j0 += block) {
            const int64_t n = std::min(block, ctx - j0);
            // Rows past ctx are poisoned: they must not be read.
            std::vector<float> b(block * (s.k_stride + s.v_stride), 1e30f);
            std::copy(k.begin() + j0 * s.k_stride, k.begin() + (j0 + n) * s.k_stride, b.begin());
            std::copy(v.begin() + j0 * s.v_stride, v.begin() + (j0 + n) * s.v_stride,
                      b.begin() + block * s.k_stride);
            blocks.push_back(std::move(b));
            seg.push_back(blocks.back().data());
          }
          AttentionShape paged = s;
          paged.segment_rows = block;
          std::vector<const void*> seg_void(seg.begin(), seg.end());
          paged.segments = seg_void.data();
          paged.v_offset = block * s.k_stride;
          ASSERT_TRUE(be_->SupportsSegmentedCache());
          std::vector<float> got(num_new * row);
          be_->CausalAttention(paged, q.data(), nullptr, nullptr, got.data());
          EXPECT_EQ(std::memcmp(got.data(), out.data(), out.size() * 4), 0)
              << "heads " << hk.heads << "/" << hk.kv_heads << " num_new " << num_new << " qk "
              << qk_dim << " block " << block;
          // The same blocks as BF16 (a BF16 KV cache): bitwise the F32 attention over the
          // BF16-rounded cache, which is what gathering it as F32 gave.
          std::vector<std::vector<uint16_t>> halves;
          std::vector<const void*> seg16;
          for (const std::vector<float>& b : blocks) {
            std::vector<uint16_t> h(b.size());
            for (size_t i = 0; i < b.size(); ++i) h[i] = FloatToBf16Bits(b[i]);
            halves.push_back(std::move(h));
            seg16.push_back(halves.back().data());
          }
          std::vector<float> k16(k.size()), v16(v.size());
          for (size_t i = 0; i < k.size(); ++i) k16[i] = Bf16BitsToFloat(FloatToBf16Bits(k[i]));
          for (size_t i = 0; i < v.size(); ++i) v16[i] = Bf16BitsToFloat(FloatToBf16Bits(v[i]));
          std::vector<float> want16(num_new * row), got16(num_new * row);
          be_->CausalAttention(s, q.data(), k16.data(), v16.data(), want16.data());
          AttentionShape paged16 = paged;
          paged16.segments = seg16.data();
          paged16.segment_dtype = DType::kBF16;
          be_->CausalAttention(paged16, q.data(), nullptr, nullptr, got16.data());
          EXPECT_EQ(std::memcmp(got16.data(), want16.data(), want16.size() * 4), 0)
              << "bf16 heads " << hk.heads << "/" << hk.kv_heads << " num_new " << num_new << " qk "
              << qk_dim << " block " << block;
        }
        for (int64_t a = 1; a < num_new; ++a) {
          std::vector<float> split(num_new * row);
          AttentionShape first = s;
          first.num_new = a;
          first.ctx = past + a;
          be_->CausalAttention(first, q.data(), k.data(), v.data(), split.data());
          AttentionShape second = s;
          second.num_new = num_new - a;
          be_->CausalAttention(second, q.data() + a * s.q_stride, k.data(), v.data(),
                               split.data() + a * row);
          EXPECT_EQ(std::memcmp(split.data(), out.data(), out.size() * 4), 0)
              << "heads " << hk.heads << "/" << hk.kv_heads << " num_new " << num_new << " qk "
              << qk_dim << " split at " << a;
        }
      }
    }
  }
}

TEST_F(CpuKernelsTest, AttentionIgnoresFutureRows) {
  // Cache rows past the last new token's position must not matter, even if they are huge.
  AttentionShape s = Dense(/*num_new=*/2, /*ctx=*/3, /*heads=*/1, /*kv_heads=*/1,
                           /*qk_dim=*/2, /*v_dim=*/2, /*scale=*/1.0f);
  const auto q = RandomFloats(4, 41), k = RandomFloats(6, 42), v = RandomFloats(6, 43);
  std::vector<float> out(4);
  be_->CausalAttention(s, q.data(), k.data(), v.data(), out.data());
  // Row 0 of the output depends only on cache rows 0, 1: change row 2 and compare.
  auto k2 = k, v2 = v;
  k2[4] = 50;
  v2[4] = 1e6f;
  std::vector<float> out2(4);
  be_->CausalAttention(s, q.data(), k2.data(), v2.data(), out2.data());
  EXPECT_FLOAT_EQ(out[0], out2[0]);
  EXPECT_FLOAT_EQ(out[1], out2[1]);
  EXPECT_NE(out[2], out2[2]);
}

// ---- SiluMul / ExpertFfn --------------------------------------------------------------------

TEST_F(CpuKernelsTest, SiluMul) {
  const float gate[4] = {1, 0, -1, 20};
  const float up[4] = {2, 5, 3, 0.5f};
  float out[4];
  be_->SiluMul(gate, up, 4, out);
  // silu(g) = g / (1 + e^-g).
  EXPECT_NEAR(out[0], 2 / (1 + std::exp(-1.0)), 1e-6);
  EXPECT_EQ(out[1], 0.0f);
  EXPECT_NEAR(out[2], 3 * -1 / (1 + std::exp(1.0)), 1e-6);
  EXPECT_NEAR(out[3], 10.0, 1e-5);
  float g[2] = {1, -1};
  be_->SiluMul(g, up, 2, g);  // out may alias gate
  EXPECT_NEAR(g[0], 2 / (1 + std::exp(-1.0)), 1e-6);
  EXPECT_NEAR(g[1], 5 * -1 / (1 + std::exp(1.0)), 1e-6);
}

TEST_F(CpuKernelsTest, ExpertFfnMatchesFormula) {
  for (int64_t m : {1, 3}) {
    const int64_t hidden = 5, inter = 7;
    const auto x = RandomFloats(m * hidden, 51 + m), w1 = RandomFloats(inter * hidden, 52),
               w3 = RandomFloats(inter * hidden, 53), w2 = RandomFloats(hidden * inter, 54);
    std::vector<float> work(2 * m * inter), y(m * hidden, 123.0f);
    be_->ExpertFfn(x.data(), m, hidden, inter, w1.data(), w3.data(), w2.data(), work.data(),
                   y.data());
    for (int64_t r = 0; r < m; ++r) {
      std::vector<double> a(inter);
      for (int64_t i = 0; i < inter; ++i) {
        double g = 0, u = 0;
        for (int64_t j = 0; j < hidden; ++j) {
          g += double(w1[i * hidden + j]) * x[r * hidden + j];
          u += double(w3[i * hidden + j]) * x[r * hidden + j];
        }
        a[i] = g / (1 + std::exp(-g)) * u;
      }
      for (int64_t j = 0; j < hidden; ++j) {
        double o = 0;
        for (int64_t i = 0; i < inter; ++i) o += double(w2[j * inter + i]) * a[i];
        EXPECT_NEAR(y[r * hidden + j], o, 1e-5) << "m=" << m << " row " << r << " col " << j;
      }
    }
  }
}

// ---- SoftmaxTopK ----------------------------------------------------------------------------

TEST_F(CpuKernelsTest, SoftmaxTopK) {
  const float logits[4] = {1, 2, 3, 0};
  int32_t ids[2];
  float w[2];
  be_->SoftmaxTopK(logits, 1, 4, 2, /*renormalize=*/false, ids, w);
  const double z = std::exp(1.0) + std::exp(2.0) + std::exp(3.0) + 1.0;
  EXPECT_THAT(ids, ElementsAre(2, 1));
  EXPECT_NEAR(w[0], std::exp(3.0) / z, 1e-6);
  EXPECT_NEAR(w[1], std::exp(2.0) / z, 1e-6);

  be_->SoftmaxTopK(logits, 1, 4, 2, /*renormalize=*/true, ids, w);
  EXPECT_THAT(ids, ElementsAre(2, 1));
  const double e = 1.0 / (1.0 + std::exp(-1.0));  // e^3 / (e^3 + e^2)
  EXPECT_NEAR(w[0], e, 1e-6);
  EXPECT_NEAR(w[1], 1 - e, 1e-6);
}

TEST_F(CpuKernelsTest, SoftmaxTopKSeveralRowsAndTies) {
  // Row 0: all equal -> ids 0, 1 (lower index first), weights 1/2 each when renormalised.
  // Row 1: the top three tie -> 1, 2. Row 2: large logits must not overflow.
  const float logits[12] = {5,    5,   5,     5,  //
                            0,    2,   2,     2,  //
                            1000, 999, -1000, 998};
  int32_t ids[6];
  float w[6];
  be_->SoftmaxTopK(logits, 3, 4, 2, /*renormalize=*/true, ids, w);
  EXPECT_THAT(ids, ElementsAre(0, 1, 1, 2, 0, 1));
  EXPECT_NEAR(w[0], 0.5, 1e-6);
  EXPECT_NEAR(w[1], 0.5, 1e-6);
  EXPECT_NEAR(w[2], 0.5, 1e-6);
  EXPECT_NEAR(w[4], 1 / (1 + std::exp(-1.0)), 1e-6);
  EXPECT_NEAR(w[5], 1 / (1 + std::exp(1.0)), 1e-6);
  be_->SoftmaxTopK(logits, 3, 4, 2, /*renormalize=*/false, ids, w);
  EXPECT_NEAR(w[0], 0.25, 1e-6);
  EXPECT_TRUE(std::isfinite(w[4]));
}

TEST_F(CpuKernelsTest, SoftmaxTopKAllExperts) {
  const float logits[3] = {0, std::log(2.0f), std::log(5.0f)};  // probabilities 1/8, 2/8, 5/8
  int32_t ids[3];
  float w[3];
  be_->SoftmaxTopK(logits, 1, 3, 3, /*renormalize=*/false, ids, w);
  EXPECT_THAT(ids, ElementsAre(2, 1, 0));
  EXPECT_NEAR(w[0], 5.0 / 8, 1e-6);
  EXPECT_NEAR(w[1], 2.0 / 8, 1e-6);
  EXPECT_NEAR(w[2], 1.0 / 8, 1e-6);
}

// ---- DeepSeek-V3 sigmoid group-limited top-k ----------------------------------------------

// (id, weight) pairs sorted by id, so that the order of the k choices does not matter.
std::vector<std::pair<int32_t, float>> Choices(const std::vector<int32_t>& ids,
                                               const std::vector<float>& w) {
  std::vector<std::pair<int32_t, float>> c;
  for (size_t i = 0; i < ids.size(); ++i) c.push_back({ids[i], w[i]});
  std::sort(c.begin(), c.end());
  return c;
}

struct Routed {
  std::vector<int32_t> ids;
  std::vector<float> weights;
};

Routed RunSigmoid(const std::vector<float>& scores, const std::vector<float>* bias,
                  const RoutingConfig& rc) {
  Routed r{std::vector<int32_t>(rc.top_k, -1), std::vector<float>(rc.top_k, -1)};
  GroupLimitedTopK(scores.data(), bias ? bias->data() : nullptr, rc, r.ids.data(),
                   r.weights.data());
  return r;
}

RoutingConfig Sigmoid(int experts, int top_k, int n_group, int topk_group, bool norm, float scale) {
  RoutingConfig rc;
  rc.num_experts = experts;
  rc.top_k = top_k;
  rc.scoring = ScoringFunc::kSigmoid;
  rc.norm_topk_prob = norm;
  rc.routed_scaling_factor = scale;
  rc.n_group = n_group;
  rc.topk_group = topk_group;
  return rc;
}

TEST(GroupLimitedTopKTest, GroupLimitChangesTheChoice) {
  // 8 experts in 4 groups of 2; keep 2 groups, choose 2 experts.
  //   group 0: {0.9, 0.1} -> 1.0     group 1: {0.65, 0.6} -> 1.25
  //   group 2: {0.55, 0.5} -> 1.05   group 3: {0.85, 0.0} -> 0.85
  // Kept: groups 1 and 2. Plain top-2 would take experts 0 and 6; group-limited takes 2, 3.
  const std::vector<float> scores = {0.9f, 0.1f, 0.65f, 0.6f, 0.55f, 0.5f, 0.85f, 0.0f};
  const std::vector<float> zero(8, 0.0f);
  Routed r = RunSigmoid(scores, &zero, Sigmoid(8, 2, 4, 2, true, 2.5f));
  // Weights: unbiased scores normalised over the chosen, times the scaling factor.
  EXPECT_THAT(Choices(r.ids, r.weights),
              ElementsAre(::testing::Pair(2, FloatNear(0.65f / 1.25f * 2.5f, 1e-6)),
                          ::testing::Pair(3, FloatNear(0.6f / 1.25f * 2.5f, 1e-6))));

  // Without group limiting (one group), the plain top-2 is 0 and 6.
  r = RunSigmoid(scores, &zero, Sigmoid(8, 2, 1, 1, true, 2.5f));
  EXPECT_THAT(Choices(r.ids, r.weights),
              ElementsAre(::testing::Pair(0, FloatNear(0.9f / 1.75f * 2.5f, 1e-6)),
                          ::testing::Pair(6, FloatNear(0.85f / 1.75f * 2.5f, 1e-6))));
}

TEST(GroupLimitedTopKTest, GroupScoreIsSumOfTopTwo) {
  // 6 experts in 2 groups of 3, keep 1 group, choose 1 expert.
  //   group 0: {0.9, 0.1, 0.1}: top-2 sum 1.0 (max 0.9, sum of all 1.1)
  //   group 1: {0.5, 0.55, 0.0}: top-2 sum 1.05 (max 0.55, sum of all 1.05)
  // Only the top-2 sum prefers group 1; then its best expert is 4.
  const std::vector<float> scores = {0.9f, 0.1f, 0.1f, 0.5f, 0.55f, 0.0f};
  const std::vector<float> zero(6, 0.0f);
  Routed r = RunSigmoid(scores, &zero, Sigmoid(6, 1, 2, 1, true, 1.0f));
  EXPECT_THAT(r.ids, ElementsAre(4));
  EXPECT_THAT(r.weights, ElementsAre(FloatNear(1.0f, 1e-6)));  // normalised over one expert
  // A gate without a bias scores groups by their largest score (DeepSeek's amax), which
  // prefers group 0 here.
  r = RunSigmoid(scores, nullptr, Sigmoid(6, 1, 2, 1, true, 1.0f));
  EXPECT_THAT(r.ids, ElementsAre(0));
}

TEST(GroupLimitedTopKTest, BiasSelectsButDoesNotWeigh) {
  // Biased scores [0.9, 0.2, 0.3, 0.7] select 0 and 3; the weights use the unbiased 0.9, 0.2.
  const std::vector<float> scores = {0.9f, 0.8f, 0.3f, 0.2f};
  const std::vector<float> bias = {0.0f, -0.6f, 0.0f, 0.5f};
  Routed r = RunSigmoid(scores, &bias, Sigmoid(4, 2, 1, 1, true, 1.0f));
  EXPECT_THAT(Choices(r.ids, r.weights),
              ElementsAre(::testing::Pair(0, FloatNear(0.9f / 1.1f, 1e-6)),
                          ::testing::Pair(3, FloatNear(0.2f / 1.1f, 1e-6))));
  // Without normalisation the weights are the raw scores times the scaling factor.
  r = RunSigmoid(scores, &bias, Sigmoid(4, 2, 1, 1, false, 2.0f));
  EXPECT_THAT(Choices(r.ids, r.weights), ElementsAre(::testing::Pair(0, FloatNear(1.8f, 1e-6)),
                                                     ::testing::Pair(3, FloatNear(0.4f, 1e-6))));
  // No bias at all: plain top-2 of the scores.
  r = RunSigmoid(scores, nullptr, Sigmoid(4, 2, 1, 1, true, 1.0f));
  EXPECT_THAT(Choices(r.ids, r.weights),
              ElementsAre(::testing::Pair(0, FloatNear(0.9f / 1.7f, 1e-6)),
                          ::testing::Pair(1, FloatNear(0.8f / 1.7f, 1e-6))));
}

TEST(GroupLimitedTopKTest, MaskedGroupsNeverChosenEvenWhenKeptScoresAreNegative) {
  // A bias of -1 makes every biased score negative. Masking dropped groups with 0 instead of
  // -inf would then pick experts of the dropped group.
  //   biased: group 0 {-0.8, -0.7} -> -1.5; group 1 {-0.1, -0.9} -> -1.0: keep group 1.
  const std::vector<float> scores = {0.2f, 0.3f, 0.9f, 0.1f};
  const std::vector<float> bias = {-1.0f, -1.0f, -1.0f, -1.0f};
  Routed r = RunSigmoid(scores, &bias, Sigmoid(4, 2, 2, 1, true, 1.0f));
  EXPECT_THAT(Choices(r.ids, r.weights), ElementsAre(::testing::Pair(2, FloatNear(0.9f, 1e-6)),
                                                     ::testing::Pair(3, FloatNear(0.1f, 1e-6))));
}

TEST(GroupLimitedTopKTest, GateRouteAppliesSigmoid) {
  // Gate::Route with sigmoid scoring: the logits pass through a sigmoid before selection.
  // hidden = [1, 0]; weight rows give logits [0, 2, -1, 1]: sigmoids 0.5, 0.881, 0.269, 0.731.
  RoutingConfig rc = Sigmoid(4, 2, 1, 1, true, 1.0f);
  Gate gate(rc, Tensor::FromVector({4, 2}, {0, 5, 2, 5, -1, 5, 1, 5}), Tensor());
  const float hidden[2] = {1, 0};
  auto be = MakeCpuBackend();
  Routing r = gate.Route(hidden, 1, be.get());
  ASSERT_EQ(r.k, 2);
  const double s1 = 1 / (1 + std::exp(-2.0)), s3 = 1 / (1 + std::exp(-1.0));
  EXPECT_THAT(Choices(r.ids, r.weights),
              ElementsAre(::testing::Pair(1, FloatNear(s1 / (s1 + s3), 1e-6)),
                          ::testing::Pair(3, FloatNear(s3 / (s1 + s3), 1e-6))));
}

TEST(SoftmaxGateTest, RouteMatchesMixtral) {
  // Softmax gating through Gate::Route: logits [1, 3, 2] -> top-2 {1, 2}, renormalised.
  RoutingConfig rc;
  rc.num_experts = 3;
  rc.top_k = 2;
  Gate gate(rc, Tensor::FromVector({3, 1}, {1, 3, 2}), Tensor());
  EXPECT_EQ(gate.hidden(), 1);
  const float hidden[2] = {1, -1};  // two tokens: the second reverses the order
  auto be = MakeCpuBackend();
  Routing r = gate.Route(hidden, 2, be.get());
  const double hi = 1 / (1 + std::exp(-1.0));
  EXPECT_THAT(r.ids, ElementsAre(1, 2, 0, 2));
  EXPECT_THAT(r.weights, ElementsAre(FloatNear(hi, 1e-6), FloatNear(1 - hi, 1e-6),
                                     FloatNear(hi, 1e-6), FloatNear(1 - hi, 1e-6)));
}

}  // namespace
}  // namespace moemesh
