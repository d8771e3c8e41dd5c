// The CPU kernel layer (services/compute/cpu/matmul.h): every instruction set this machine can
// run, forced in turn, against the scalar reference, bitwise; batch invariance as a property
// over random batch compositions; each weight dtype against F32 over the same dequantised
// weights.
#include "services/compute/cpu/matmul.h"

#include <sched.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <random>
#include <set>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "services/compute/cpu/kernel_threads.h"
#include "services/compute/cpu/matmul_internal.h"
#include "services/model/fp8.h"
#include "services/tensor/tensor.h"

namespace moemesh::cpu {
namespace {

// A weight of `dtype` [rows, cols] built from random values, owning its bytes.
Weight MakeWeight(DType dtype, int64_t rows, int64_t cols, uint32_t seed, int block = 128) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 0.5f);
  std::vector<float> v(rows * cols);
  for (float& f : v) f = nd(rng);
  Weight w;
  w.dtype = dtype;
  w.rows = rows;
  w.cols = cols;
  if (dtype == DType::kF8E4M3) {
    Fp8Blocks q = QuantizeFp8Blocks(v, rows, cols, block, block);
    auto bytes = std::make_shared<std::vector<uint8_t>>(std::move(q.data));
    auto scales = std::make_shared<std::vector<float>>(std::move(q.scale_inv));
    w.data = bytes->data();
    w.scale_inv = scales->data();
    w.block_rows = w.block_cols = block;
    w.owner = std::make_shared<std::pair<decltype(bytes), decltype(scales)>>(bytes, scales);
    return w;
  }
  auto bytes = std::make_shared<std::vector<uint8_t>>(v.size() * DTypeSize(dtype));
  ConvertFromF32(dtype, v.data(), v.size(), bytes->data());
  w.data = bytes->data();
  w.owner = bytes;
  return w;
}

std::vector<float> RandomX(int64_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> v(n);
  for (float& f : v) f = nd(rng);
  return v;
}

std::vector<Isa> Levels() {
  std::vector<Isa> l;
  for (int i = 0; i <= static_cast<int>(DetectedIsa()); ++i) l.push_back(static_cast<Isa>(i));
  return l;
}

class IsaGuard {
 public:
  explicit IsaGuard(Isa isa) { SetIsa(isa); }
  ~IsaGuard() { SetIsa(DetectedIsa()); }
};

bool BitwiseEqual(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * 4) == 0;
}

const DType kDTypes[] = {DType::kF32, DType::kBF16, DType::kF16, DType::kF8E4M3};

TEST(MatMulTest, EveryIsaMatchesTheScalarReferenceBitwise) {
  std::printf("detected instruction set: %s\n", IsaName(DetectedIsa()));
  for (Isa isa : Levels()) {
    IsaGuard guard(isa);
    ASSERT_EQ(ActiveIsa(), isa);
    for (DType dt : kDTypes) {
      for (int64_t k : {1, 7, 8, 9, 15, 16, 17, 100, 256}) {
        for (int64_t n : {1, 7, 40}) {
          const int block = (dt == DType::kF8E4M3 && k >= 32) ? 32 : 16;
          const Weight w = MakeWeight(dt, n, k, static_cast<uint32_t>(k * 31 + n), block);
          for (int64_t m : {1, 2, 3, 4, 5, 8, 9, 17, 32}) {
            const std::vector<float> x = RandomX(m * k, static_cast<uint32_t>(m));
            for (bool acc : {false, true}) {
              std::vector<float> y(m * n, 0.25f), ref(m * n, 0.25f);
              MatMul(x.data(), m, w, y.data(), acc);
              MatMulReference(x.data(), m, w, ref.data(), acc);
              ASSERT_TRUE(BitwiseEqual(y, ref))
                  << IsaName(isa) << " " << DTypeName(dt) << " m=" << m << " k=" << k << " n=" << n
                  << " acc=" << acc;
            }
          }
        }
      }
    }
  }
}

// The AVX-512 kernel's tile shapes (4 × 3 tiles, 8 weight rows per single-row tile) run with AVX2
// instructions, so that a machine without AVX-512 still checks that kernel's tiling: remainders
// of rows and columns, panels, the next-panel prefetch and every dtype's decode-then-tile path.
TEST(MatMulTest, Avx512TilingMatchesTheScalarReferenceBitwise) {
  if (DetectedIsa() < Isa::kAvx2) GTEST_SKIP() << "needs AVX2";
  for (DType dt : kDTypes) {
    for (int64_t k : {1, 7, 8, 9, 15, 16, 17, 100, 256}) {
      for (int64_t n : {1, 3, 7, 8, 9, 40, 70}) {
        const int block = (dt == DType::kF8E4M3 && k >= 32) ? 32 : 16;
        const Weight w = MakeWeight(dt, n, k, static_cast<uint32_t>(k * 17 + n), block);
        std::vector<float> scratch(internal::kPanelRows * k + internal::kLanes);
        for (int64_t m : {1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 33}) {
          const std::vector<float> x = RandomX(m * k, static_cast<uint32_t>(m + 100));
          for (bool acc : {false, true}) {
            std::vector<float> y(m * n, 0.5f), ref(m * n, 0.5f);
            // In two column ranges, as the thread pool splits them.
            const int64_t half = n / 2;
            internal::RowsAvx2WithAvx512Tiles(x.data(), m, w, 0, half, y.data(), n, acc,
                                              scratch.data());
            internal::RowsAvx2WithAvx512Tiles(x.data(), m, w, half, n, y.data(), n, acc,
                                              scratch.data());
            MatMulReference(x.data(), m, w, ref.data(), acc);
            ASSERT_TRUE(BitwiseEqual(y, ref))
                << DTypeName(dt) << " m=" << m << " k=" << k << " n=" << n << " acc=" << acc;
          }
        }
      }
    }
  }
}

// Attention's dot products and updates: every level gives the scalar result, bitwise.
TEST(MatMulTest, DotAndAxpyAreTheSameAtEveryIsa) {
  for (int64_t n : {1, 5, 8, 13, 64, 100}) {
    const std::vector<float> a = RandomX(n, 1), b = RandomX(n, 2);
    std::vector<float> want_y;
    float want = 0;
    for (Isa isa : Levels()) {
      IsaGuard guard(isa);
      const float d = Dot(a.data(), b.data(), n);
      std::vector<float> y = b;
      Axpy(0.37f, a.data(), y.data(), n);
      if (isa == Isa::kScalar) {
        want = d;
        want_y = y;
        float lanes[8] = {};
        for (int64_t c = 0; c < n; ++c) lanes[c % 8] = std::fma(a[c], b[c], lanes[c % 8]);
        EXPECT_EQ(d, internal::ReduceLanes(lanes)) << "n=" << n;
        for (int64_t i = 0; i < n; ++i) EXPECT_EQ(y[i], std::fma(0.37f, a[i], b[i]));
      }
      EXPECT_EQ(std::memcmp(&d, &want, 4), 0) << IsaName(isa) << " n=" << n;
      EXPECT_TRUE(BitwiseEqual(y, want_y)) << IsaName(isa) << " n=" << n;
    }
  }
}

// Attention's batched loops: bitwise the one-row calls, at every level, for key / value widths
// with and without a tail, row counts around the 4-row groups, and strided rows.
TEST(MatMulTest, DotRowsAndAxpyRowsAreTheOneRowCalls) {
  for (int64_t n : {1, 5, 8, 13, 64, 100, 130}) {
    for (int64_t rows : {1, 3, 4, 7, 33}) {
      const int64_t stride = n + 3;
      const std::vector<float> q = RandomX(n, 3), kv = RandomX(rows * stride, 4);
      const std::vector<float> p = RandomX(rows, 5), y0 = RandomX(n, 6);
      for (Isa isa : Levels()) {
        IsaGuard guard(isa);
        std::vector<float> scores(rows), want_scores(rows);
        DotRows(q.data(), kv.data(), stride, rows, n, 0.125f, scores.data());
        std::vector<float> y = y0, want_y = y0;
        AxpyRows(p.data(), 0.37f, kv.data(), stride, rows, n, y.data());
        {
          IsaGuard scalar(Isa::kScalar);
          for (int64_t j = 0; j < rows; ++j) {
            want_scores[j] = Dot(q.data(), kv.data() + j * stride, n) * 0.125f;
            Axpy(p[j] * 0.37f, kv.data() + j * stride, want_y.data(), n);
          }
        }
        EXPECT_TRUE(BitwiseEqual(scores, want_scores))
            << IsaName(isa) << " n=" << n << " rows=" << rows;
        EXPECT_TRUE(BitwiseEqual(y, want_y)) << IsaName(isa) << " n=" << n << " rows=" << rows;
      }
    }
  }
}

// The multi-query forms: every query row bitwise its own DotRows / AxpyRows call, at every
// level, for query counts around the 4-row tiles, key counts around the 3-key tiles, widths with
// and without a tail, and value row counts that differ per query row (causal prefill).
TEST(MatMulTest, MultiQueryRowsAreTheOneQueryCalls) {
  std::mt19937 rng(11);
  for (int64_t n : {1, 5, 8, 13, 64, 100, 130}) {
    for (int64_t nq : {1, 2, 3, 4, 5, 8, 9}) {
      const int64_t rows = 1 + static_cast<int64_t>(rng() % 40), stride = n + 5;
      const int64_t q_stride = n + 3, ld = rows + 2, y_stride = n + 7;
      const std::vector<float> q = RandomX(nq * q_stride, 12), kv = RandomX(rows * stride, 13);
      const std::vector<float> p = RandomX(nq * ld, 14), y0 = RandomX(nq * y_stride, 15);
      std::vector<float> scales(nq);
      std::vector<int64_t> use(nq);
      for (int64_t r = 0; r < nq; ++r) {
        scales[r] = 0.25f + 0.1f * static_cast<float>(r);
        use[r] = static_cast<int64_t>(rng() % (rows + 1));  // 0 .. rows value rows
      }
      for (Isa isa : Levels()) {
        IsaGuard guard(isa);
        std::vector<float> scores(nq * ld, -1.0f), want_scores = scores;
        DotRowsMulti(q.data(), q_stride, nq, kv.data(), stride, rows, n, 0.125f, scores.data(), ld);
        std::vector<float> y = y0, want_y = y0;
        AxpyRowsMulti(p.data(), ld, scales.data(), use.data(), nq, kv.data(), stride, n, y.data(),
                      y_stride);
        {
          IsaGuard scalar(Isa::kScalar);
          for (int64_t r = 0; r < nq; ++r) {
            DotRows(q.data() + r * q_stride, kv.data(), stride, rows, n, 0.125f,
                    want_scores.data() + r * ld);
            AxpyRows(p.data() + r * ld, scales[r], kv.data(), stride, use[r], n,
                     want_y.data() + r * y_stride);
          }
        }
        EXPECT_TRUE(BitwiseEqual(scores, want_scores))
            << IsaName(isa) << " n=" << n << " nq=" << nq << " rows=" << rows;
        EXPECT_TRUE(BitwiseEqual(y, want_y))
            << IsaName(isa) << " n=" << n << " nq=" << nq << " rows=" << rows;
      }
    }
  }
}

// Exp against the exact value (double precision) within 2 ulp over its finite range, its edges
// (0 below kExpMin, +inf above kExpMax, NaN through), and bitwise the same at every level in
// all three vector entry points (ExpShiftSum with shift 0, SiluMul against the scalar formula).
TEST(MatMulTest, ExpIsAccurateAndTheSameAtEveryIsa) {
  std::vector<float> xs = {0.0f,
                           -0.0f,
                           1.0f,
                           -1.0f,
                           0.5f,
                           1e-8f,
                           -1e-8f,
                           10.0f,
                           -10.0f,
                           internal::kExpMax,
                           internal::kExpMin,
                           std::nextafter(internal::kExpMax, 100.0f),
                           std::nextafter(internal::kExpMin, -100.0f),
                           std::nextafter(internal::kExpMax, 0.0f),
                           std::nextafter(internal::kExpMin, 0.0f),
                           88.7f,
                           -87.5f,
                           -103.0f,
                           200.0f,
                           -200.0f,
                           INFINITY,
                           -INFINITY,
                           NAN,
                           3.4e38f,
                           -3.4e38f};
  for (int i = -126; i <= 127; ++i) xs.push_back(static_cast<float>(i) * 0.693147180559945f);
  std::mt19937 rng(21);
  std::uniform_real_distribution<float> wide(-90.0f, 90.0f), narrow(-2.0f, 2.0f);
  for (int i = 0; i < 200000; ++i) xs.push_back(i % 2 ? wide(rng) : narrow(rng));
  std::vector<float> want(xs.size());
  double worst = 0;
  for (size_t i = 0; i < xs.size(); ++i) {
    const float x = xs[i];
    const float e = Exp(x);
    want[i] = e;
    if (std::isnan(x)) {
      EXPECT_TRUE(std::isnan(e));
    } else if (x > internal::kExpMax) {
      EXPECT_EQ(e, INFINITY) << x;
    } else if (x < internal::kExpMin) {
      EXPECT_EQ(e, 0.0f) << x;
    } else {
      const double exact = std::exp(static_cast<double>(x));
      const double ulp =
          std::nextafter(static_cast<float>(exact), INFINITY) - static_cast<float>(exact);
      const double err = std::fabs(e - exact) / ulp;
      worst = std::max(worst, err);
      EXPECT_LE(err, 2.0) << "x=" << x << " Exp=" << e << " exact=" << exact;
    }
  }
  std::printf("Exp: worst error %.2f ulp over %zu values\n", worst, xs.size());
  const std::vector<float> up = RandomX(xs.size(), 22);
  for (Isa isa : Levels()) {
    IsaGuard guard(isa);
    // Lengths around the 8-lane vectors, so that the masked tails are covered too.
    for (int64_t n : {int64_t{1}, int64_t{7}, int64_t{8}, int64_t{9}, int64_t{31},
                      static_cast<int64_t>(xs.size())}) {
      std::vector<float> s(xs.begin(), xs.begin() + n);
      ExpShiftSum(s.data(), n, 0.0f);
      EXPECT_EQ(std::memcmp(s.data(), want.data(), n * 4), 0) << IsaName(isa) << " n=" << n;
      std::vector<float> out(n), ref(n);
      SiluMul(xs.data(), up.data(), n, out.data());
      for (int64_t i = 0; i < n; ++i) ref[i] = xs[i] / (1.0f + Exp(-xs[i])) * up[i];
      EXPECT_EQ(std::memcmp(out.data(), ref.data(), n * 4), 0) << IsaName(isa) << " n=" << n;
    }
  }
}

// ExpShiftSum's sum is the canonical 8-lane sum of the values it writes, at every level.
TEST(MatMulTest, ExpShiftSumSumsInTheCanonicalOrder) {
  for (int64_t n : {1, 3, 8, 9, 17, 100, 513}) {
    const std::vector<float> x = RandomX(n, 23);
    float want_sum = 0;
    std::vector<float> want;
    for (Isa isa : Levels()) {
      IsaGuard guard(isa);
      std::vector<float> s = x;
      const float sum = ExpShiftSum(s.data(), n, 1.5f);
      if (isa == Isa::kScalar) {
        float lanes[8] = {};
        for (int64_t i = 0; i < n; ++i) {
          EXPECT_EQ(s[i], Exp(x[i] - 1.5f));
          lanes[i % 8] += s[i];
        }
        EXPECT_EQ(sum, internal::ReduceLanes(lanes)) << "n=" << n;
        want_sum = sum;
        want = s;
      }
      EXPECT_EQ(std::memcmp(&sum, &want_sum, 4), 0) << IsaName(isa) << " n=" << n;
      EXPECT_TRUE(BitwiseEqual(s, want)) << IsaName(isa) << " n=" << n;
    }
  }
}

// FP8 blocks 48 wide (a multiple of 16 that is not a power of two: the in-place decode path
// divides instead of shifting), rows 48 high, at every level.
TEST(MatMulTest, Fp8BlocksNotAPowerOfTwoMatchTheReference) {
  const Weight w = MakeWeight(DType::kF8E4M3, 100, 150, 9, /*block=*/48);
  for (Isa isa : Levels()) {
    IsaGuard guard(isa);
    for (int64_t m : {1, 2, 3, 7}) {
      const std::vector<float> x = RandomX(m * 150, static_cast<uint32_t>(m + 40));
      std::vector<float> y(m * 100), ref(m * 100);
      MatMul(x.data(), m, w, y.data());
      MatMulReference(x.data(), m, w, ref.data(), false);
      EXPECT_TRUE(BitwiseEqual(y, ref)) << IsaName(isa) << " m=" << m;
    }
  }
}

// FP8 blocks whose width is not a multiple of 16 take the scalar path at every level.
TEST(MatMulTest, Fp8OddBlocksMatchTheReference) {
  const Weight w = MakeWeight(DType::kF8E4M3, 20, 50, 7, /*block=*/12);
  const std::vector<float> x = RandomX(3 * 50, 3);
  for (Isa isa : Levels()) {
    IsaGuard guard(isa);
    std::vector<float> y(60), ref(60);
    MatMul(x.data(), 3, w, y.data());
    MatMulReference(x.data(), 3, w, ref.data(), false);
    EXPECT_TRUE(BitwiseEqual(y, ref)) << IsaName(isa);
  }
}

// The reference itself against plain double-precision dot products: it must be a dot product.
TEST(MatMulTest, ReferenceIsADotProduct) {
  const int64_t m = 3, k = 300, n = 5;
  const Weight w = MakeWeight(DType::kBF16, n, k, 11);
  const std::vector<float> x = RandomX(m * k, 12);
  std::vector<float> y(m * n);
  MatMulReference(x.data(), m, w, y.data(), false);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double d = 0;
      for (int64_t c = 0; c < k; ++c) d += static_cast<double>(x[i * k + c]) * WeightAt(w, j, c);
      EXPECT_NEAR(y[i * n + j], d, 1e-4 * (1 + std::fabs(d)));
    }
  }
}

// A row's result never depends on the other rows of the call: random batch compositions, the
// row at a random position, every level, every dtype, MatMul and GateUpSilu.
TEST(MatMulTest, BatchInvarianceProperty) {
  std::mt19937 rng(2024);
  const int64_t k = 96, n = 80;
  for (Isa isa : Levels()) {
    IsaGuard guard(isa);
    for (DType dt : kDTypes) {
      const Weight w1 = MakeWeight(dt, n, k, 1, 32), w3 = MakeWeight(dt, n, k, 2, 32);
      const std::vector<float> probe = RandomX(k, 99);
      std::vector<float> alone(n), alone_h(n);
      MatMul(probe.data(), 1, w1, alone.data());
      GateUpSilu(probe.data(), 1, w1, w3, alone_h.data());
      for (int trial = 0; trial < 20; ++trial) {
        const int64_t m = 1 + static_cast<int64_t>(rng() % 40);
        const int64_t pos = static_cast<int64_t>(rng() % m);
        std::vector<float> x = RandomX(m * k, rng());
        std::memcpy(x.data() + pos * k, probe.data(), k * 4);
        std::vector<float> y(m * n), h(m * n);
        MatMul(x.data(), m, w1, y.data());
        GateUpSilu(x.data(), m, w1, w3, h.data());
        ASSERT_EQ(std::memcmp(y.data() + pos * n, alone.data(), n * 4), 0)
            << IsaName(isa) << " " << DTypeName(dt) << " m=" << m << " pos=" << pos;
        ASSERT_EQ(std::memcmp(h.data() + pos * n, alone_h.data(), n * 4), 0)
            << IsaName(isa) << " " << DTypeName(dt) << " m=" << m << " pos=" << pos;
      }
    }
  }
}

// Each dtype against F32 over the same dequantised weights. The kernels dequantise exactly
// (every BF16, F16 and E4M3×scale value is an F32 value, and the FP8 product with its scale
// rounds once, as the F32 dequantisation does) and then run the same operations, so the
// tolerance is zero: the results are bitwise equal. The only error of a low-precision
// checkpoint is its quantisation, which no kernel can undo.
TEST(MatMulTest, DTypesEqualF32OverTheDequantisedWeights) {
  const int64_t m = 5, k = 256, n = 64;
  const std::vector<float> x = RandomX(m * k, 5);
  for (Isa isa : Levels()) {
    IsaGuard guard(isa);
    for (DType dt : {DType::kBF16, DType::kF16, DType::kF8E4M3}) {
      const Weight w = MakeWeight(dt, n, k, 9);
      auto deq = std::make_shared<std::vector<float>>(n * k);
      DequantizeRows(w, 0, n, deq->data());
      const Weight f = F32Weight(deq->data(), n, k, deq);
      std::vector<float> y(m * n), yf(m * n);
      MatMul(x.data(), m, w, y.data());
      MatMul(x.data(), m, f, yf.data());
      EXPECT_TRUE(BitwiseEqual(y, yf)) << IsaName(isa) << " " << DTypeName(dt);
      // And the dequantisation agrees with the checkpoint decoders of tensor.h.
      if (dt == DType::kF8E4M3) {
        std::vector<float> d2(n * k);
        ASSERT_TRUE(DequantizeFp8Blocks(
                        absl::MakeConstSpan(static_cast<const uint8_t*>(w.data), n * k), n, k,
                        absl::MakeConstSpan(w.scale_inv, w.scale_rows() * w.scale_cols()),
                        {w.scale_rows(), w.scale_cols()}, 128, 128, d2.data())
                        .ok());
        EXPECT_TRUE(BitwiseEqual(*deq, d2));
      } else {
        std::vector<float> d2(n * k);
        ConvertToF32(dt, w.data, n * k, d2.data());
        EXPECT_TRUE(BitwiseEqual(*deq, d2));
      }
    }
  }
}

// The BLAS path (opt-in) agrees with the kernels to float rounding.
TEST(MatMulTest, BlasPathAgreesWithinRounding) {
  const int64_t m = 40, k = 128, n = 48;
  const std::vector<float> x = RandomX(m * k, 8);
  for (DType dt : kDTypes) {
    const Weight w = MakeWeight(dt, n, k, 10);
    std::vector<float> y(m * n), ref(m * n);
    MatMulReference(x.data(), m, w, ref.data(), false);
    set_blas_min_rows(16);
    MatMul(x.data(), m, w, y.data());
    set_blas_min_rows(0);
    for (int64_t i = 0; i < m * n; ++i) EXPECT_NEAR(y[i], ref[i], 1e-4f * (1 + std::fabs(ref[i])));
  }
}

// The default pool size follows the CPUs the process may run on (taskset, a container's
// cpuset) and its cgroup's CPU quota, not the machine's: a worker pinned to one CPU gets one
// thread.
TEST(KernelThreadsTest, DefaultFollowsTheAffinityMask) {
  cpu_set_t all;
  ASSERT_EQ(sched_getaffinity(0, sizeof(all), &all), 0);
  const int limit = CgroupCpuLimit();
  EXPECT_EQ(DefaultKernelThreads(), limit > 0 ? std::min(CPU_COUNT(&all), limit) : CPU_COUNT(&all));
  int first = 0;
  while (!CPU_ISSET(first, &all)) ++first;
  cpu_set_t one;
  CPU_ZERO(&one);
  CPU_SET(first, &one);
  ASSERT_EQ(sched_setaffinity(0, sizeof(one), &one), 0);
  const int pinned = DefaultKernelThreads();
  ASSERT_EQ(sched_setaffinity(0, sizeof(all), &all), 0);
  EXPECT_EQ(pinned, 1);
}

// A Kubernetes CPU limit reaches the process as a cgroup quota: 2.5 CPUs' worth of quota is 3
// threads, "max" (v2) or -1 (v1) is none, and malformed text is none rather than a guess.
TEST(KernelThreadsTest, CgroupQuotaParsing) {
  using internal::CpuLimitFromCfs;
  using internal::CpuLimitFromCpuMax;
  EXPECT_EQ(CpuLimitFromCpuMax("max 100000\n"), 0);
  EXPECT_EQ(CpuLimitFromCpuMax("200000 100000\n"), 2);
  EXPECT_EQ(CpuLimitFromCpuMax("250000 100000"), 3);
  EXPECT_EQ(CpuLimitFromCpuMax("50000 100000"), 1);
  EXPECT_EQ(CpuLimitFromCpuMax("1600000 100000"), 16);
  EXPECT_EQ(CpuLimitFromCpuMax(""), 0);
  EXPECT_EQ(CpuLimitFromCpuMax("-5 100000"), 0);
  EXPECT_EQ(CpuLimitFromCpuMax("12x 100000"), 0);
  EXPECT_EQ(CpuLimitFromCpuMax("100000"), 0);
  EXPECT_EQ(CpuLimitFromCpuMax("100000 0"), 0);
  EXPECT_EQ(CpuLimitFromCpuMax("99999999999999999999999 100000"), 0);
  EXPECT_EQ(CpuLimitFromCfs(-1, 100000), 0);
  EXPECT_EQ(CpuLimitFromCfs(400000, 100000), 4);
  EXPECT_EQ(CpuLimitFromCfs(150000, 100000), 2);
  EXPECT_EQ(CpuLimitFromCfs(100000, 0), 0);
}

TEST(KernelThreadsTest, CoversEveryIndexOnceAndNests) {
  std::vector<int> hits(1000);
  KernelThreads::Get().ParallelFor(1000, 7, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) ++hits[i];
    // A nested region runs inline rather than deadlocking.
    KernelThreads::Get().ParallelFor(3, 1, [](int64_t, int64_t) {});
  });
  for (int h : hits) ASSERT_EQ(h, 1);
}

// After the pool exists, SetThreads lowers (and restores) the threads a region uses: with one,
// every chunk runs on the caller.
TEST(KernelThreadsTest, SetThreadsAfterStartLimitsARegion) {
  KernelThreads& pool = KernelThreads::Get();
  const int size = pool.threads();
  KernelThreads::SetThreads(1);
  EXPECT_EQ(pool.threads(), 1);
  std::mutex mu;
  std::set<std::thread::id> ids;
  std::vector<int> hits(64);
  pool.ParallelFor(64, 1, [&](int64_t b, int64_t e) {
    std::lock_guard<std::mutex> l(mu);
    ids.insert(std::this_thread::get_id());
    for (int64_t i = b; i < e; ++i) ++hits[i];
  });
  EXPECT_EQ(ids, std::set<std::thread::id>{std::this_thread::get_id()});
  for (int h : hits) EXPECT_EQ(h, 1);
  KernelThreads::SetThreads(size + 1);  // never more than the pool has
  EXPECT_EQ(pool.threads(), size);
  KernelThreads::SetThreads(0);
  EXPECT_EQ(pool.threads(), size);
}

}  // namespace
}  // namespace moemesh::cpu
