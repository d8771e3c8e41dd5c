// Tests of services/tensor: dtype conversions against IEEE / OCP FP8 bit patterns worked out
// by hand, and the storage semantics of Tensor (views, clones, reshapes).
#include "services/tensor/tensor.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace moemesh {
namespace {

// 2^e as a float, exactly.
float Pow2(int e) { return std::ldexp(1.0f, e); }

// ---- dtype names ---------------------------------------------------------------------------

TEST(DTypeTest, ParseNamesAndSizes) {
  struct Case {
    const char* name;
    DType dtype;
    size_t size;
  };
  for (const Case& c : {Case{"F32", DType::kF32, 4}, Case{"F16", DType::kF16, 2},
                        Case{"BF16", DType::kBF16, 2}, Case{"F8_E4M3", DType::kF8E4M3, 1}}) {
    absl::StatusOr<DType> d = ParseDType(c.name);
    ASSERT_TRUE(d.ok()) << c.name << ": " << d.status();
    EXPECT_EQ(*d, c.dtype) << c.name;
    EXPECT_EQ(DTypeName(c.dtype), c.name);
    EXPECT_EQ(DTypeSize(c.dtype), c.size) << c.name;
  }
}

TEST(DTypeTest, RejectsUnknownNames) {
  for (const char* name : {"F64", "Q4", "f32", "", "I8", "F8_E5M2"}) {
    absl::StatusOr<DType> d = ParseDType(name);
    EXPECT_FALSE(d.ok()) << "'" << name << "' parsed";
    if (!d.ok()) {
      EXPECT_EQ(d.status().code(), absl::StatusCode::kInvalidArgument) << name;
    }
  }
}

// ---- F16 -----------------------------------------------------------------------------------

TEST(HalfTest, KnownEncodings) {
  // sign | 5-bit exponent (bias 15) | 10-bit mantissa.
  EXPECT_EQ(FloatToHalf(1.0f), 0x3C00);                 // 0 01111 0000000000
  EXPECT_EQ(FloatToHalf(-2.0f), 0xC000);                // 1 10000 0000000000
  EXPECT_EQ(FloatToHalf(0.5f), 0x3800);                 // 0 01110 0000000000
  EXPECT_EQ(FloatToHalf(1.5f), 0x3E00);                 // 0 01111 1000000000
  EXPECT_EQ(FloatToHalf(65504.0f), 0x7BFF);             // largest finite: (2 - 2^-10) * 2^15
  EXPECT_EQ(FloatToHalf(Pow2(-14)), 0x0400);            // smallest normal
  EXPECT_EQ(FloatToHalf(Pow2(-24)), 0x0001);            // smallest subnormal
  EXPECT_EQ(FloatToHalf(1023.0f * Pow2(-24)), 0x03FF);  // largest subnormal
  EXPECT_EQ(FloatToHalf(0.0f), 0x0000);
  EXPECT_EQ(FloatToHalf(-0.0f), 0x8000);
  EXPECT_EQ(FloatToHalf(std::numeric_limits<float>::infinity()), 0x7C00);
  EXPECT_EQ(FloatToHalf(-std::numeric_limits<float>::infinity()), 0xFC00);

  EXPECT_EQ(HalfToFloat(0x3C00), 1.0f);
  EXPECT_EQ(HalfToFloat(0xC000), -2.0f);
  EXPECT_EQ(HalfToFloat(0x7BFF), 65504.0f);
  EXPECT_EQ(HalfToFloat(0x0001), Pow2(-24));
  EXPECT_EQ(HalfToFloat(0x8001), -Pow2(-24));
  EXPECT_EQ(HalfToFloat(0x03FF), 1023.0f * Pow2(-24));
  EXPECT_EQ(HalfToFloat(0x0400), Pow2(-14));
  EXPECT_EQ(HalfToFloat(0x3555), 1365.0f * Pow2(-12));  // 0 01101 0101010101 = 0.33325195...
  EXPECT_TRUE(std::isinf(HalfToFloat(0x7C00)));
  EXPECT_TRUE(std::isnan(HalfToFloat(0x7E00)));
  EXPECT_TRUE(std::signbit(HalfToFloat(0x8000)));
}

TEST(HalfTest, RoundsToNearestEven) {
  const float ulp1 = Pow2(-10);  // spacing of halves in [1, 2)
  // Exactly halfway between 0x3C00 (even) and 0x3C01: stays at the even one.
  EXPECT_EQ(FloatToHalf(1.0f + ulp1 / 2), 0x3C00);
  // Halfway between 0x3C01 and 0x3C02 (even): goes up.
  EXPECT_EQ(FloatToHalf(1.0f + 3 * ulp1 / 2), 0x3C02);
  // A hair above halfway rounds up, a hair below rounds down.
  EXPECT_EQ(FloatToHalf(1.0f + ulp1 / 2 + Pow2(-20)), 0x3C01);
  EXPECT_EQ(FloatToHalf(1.0f + ulp1 / 2 - Pow2(-20)), 0x3C00);
  // Rounding up the largest mantissa carries into the exponent: 2 - 2^-11 -> 2.0.
  EXPECT_EQ(FloatToHalf(2.0f - Pow2(-11)), 0x4000);
  // Overflow: 65519 still rounds to 65504; 65520 is the tie with 65536 (even) -> infinity.
  EXPECT_EQ(FloatToHalf(65519.0f), 0x7BFF);
  EXPECT_EQ(FloatToHalf(65520.0f), 0x7C00);
  EXPECT_EQ(FloatToHalf(1e10f), 0x7C00);
  // Subnormal ties: 2^-25 is halfway between 0 and 2^-24 -> 0; 1.5 * 2^-24 -> 2 * 2^-24.
  EXPECT_EQ(FloatToHalf(Pow2(-25)), 0x0000);
  EXPECT_EQ(FloatToHalf(3.0f * Pow2(-25)), 0x0002);
  EXPECT_EQ(FloatToHalf(Pow2(-25) * 1.001f), 0x0001);
  EXPECT_EQ(FloatToHalf(Pow2(-30)), 0x0000);
  // The largest subnormal plus half an ulp ties with 2^-14 (even mantissa 0) -> normal.
  EXPECT_EQ(FloatToHalf(1023.5f * Pow2(-24)), 0x0400);
}

TEST(HalfTest, NanStaysNan) {
  const uint16_t h = FloatToHalf(std::numeric_limits<float>::quiet_NaN());
  EXPECT_EQ(h & 0x7C00, 0x7C00);
  EXPECT_NE(h & 0x03FF, 0);
  EXPECT_TRUE(std::isnan(HalfToFloat(h)));
}

TEST(HalfTest, EveryFiniteHalfRoundTrips) {
  int checked = 0;
  for (uint32_t h = 0; h <= 0xFFFF; ++h) {
    if ((h & 0x7C00) == 0x7C00) continue;  // inf / nan
    const float f = HalfToFloat(static_cast<uint16_t>(h));
    ASSERT_EQ(FloatToHalf(f), h) << std::hex << "half 0x" << h << " -> " << f;
    ++checked;
  }
  EXPECT_EQ(checked, 2 * 31 * 1024);
}

// ---- BF16 ----------------------------------------------------------------------------------

TEST(BF16Test, KnownEncodings) {
  EXPECT_EQ(FloatToBF16(1.0f), 0x3F80);
  EXPECT_EQ(FloatToBF16(-2.0f), 0xC000);
  EXPECT_EQ(FloatToBF16(3.140625f), 0x4049);  // 1.5703125 * 2: mantissa 0b1001001
  EXPECT_EQ(FloatToBF16(0.0f), 0x0000);
  EXPECT_EQ(FloatToBF16(-0.0f), 0x8000);
  EXPECT_EQ(BF16ToFloat(0x3F80), 1.0f);
  EXPECT_EQ(BF16ToFloat(0x4049), 3.140625f);
  EXPECT_EQ(BF16ToFloat(0xBF00), -0.5f);
  EXPECT_TRUE(std::isinf(BF16ToFloat(0x7F80)));
}

TEST(BF16Test, RoundsToNearestEven) {
  const float ulp1 = Pow2(-7);                          // bf16 has 7 mantissa bits
  EXPECT_EQ(FloatToBF16(1.0f + ulp1 / 2), 0x3F80);      // tie -> even (down)
  EXPECT_EQ(FloatToBF16(1.0f + 3 * ulp1 / 2), 0x3F82);  // tie -> even (up)
  EXPECT_EQ(FloatToBF16(1.0f + ulp1 / 2 + Pow2(-20)), 0x3F81);
  EXPECT_EQ(FloatToBF16(1.0f + ulp1 / 2 - Pow2(-20)), 0x3F80);
  // FLT_MAX rounds up past the largest finite bf16 to infinity.
  EXPECT_EQ(FloatToBF16(std::numeric_limits<float>::max()), 0x7F80);
  const uint16_t nan = FloatToBF16(std::numeric_limits<float>::quiet_NaN());
  EXPECT_TRUE(std::isnan(BF16ToFloat(nan)));
}

TEST(BF16Test, EveryFiniteBF16RoundTrips) {
  for (uint32_t b = 0; b <= 0xFFFF; ++b) {
    if ((b & 0x7F80) == 0x7F80) continue;
    const float f = BF16ToFloat(static_cast<uint16_t>(b));
    ASSERT_EQ(FloatToBF16(f), b) << std::hex << "bf16 0x" << b;
  }
}

// ---- FP8 E4M3 (OCP "fn": no infinities, one NaN per sign, max 448) -------------------------

TEST(F8E4M3Test, KnownEncodings) {
  // sign | 4-bit exponent (bias 7) | 3-bit mantissa.
  EXPECT_EQ(FloatToF8E4M3(1.0f), 0x38);  // 0 0111 000
  EXPECT_EQ(F8E4M3ToFloat(0x38), 1.0f);
  EXPECT_EQ(FloatToF8E4M3(-1.0f), 0xB8);
  EXPECT_EQ(FloatToF8E4M3(448.0f), 0x7E);  // 0 1111 110 = 1.75 * 2^8
  EXPECT_EQ(F8E4M3ToFloat(0x7E), 448.0f);
  EXPECT_EQ(F8E4M3ToFloat(0x39), 1.125f);
  EXPECT_EQ(F8E4M3ToFloat(0x08), Pow2(-6));         // smallest normal
  EXPECT_EQ(F8E4M3ToFloat(0x01), Pow2(-9));         // smallest subnormal: 1/8 * 2^-6
  EXPECT_EQ(F8E4M3ToFloat(0x07), 7.0f * Pow2(-9));  // largest subnormal
  EXPECT_EQ(FloatToF8E4M3(Pow2(-9)), 0x01);
  EXPECT_EQ(FloatToF8E4M3(0.0f), 0x00);
  EXPECT_TRUE(std::isnan(F8E4M3ToFloat(0x7F)));
  EXPECT_TRUE(std::isnan(F8E4M3ToFloat(0xFF)));
  EXPECT_TRUE(std::isnan(F8E4M3ToFloat(FloatToF8E4M3(std::numeric_limits<float>::quiet_NaN()))));
}

// The binary search gives what a scan of every code gives (nearest value, ties to the even
// code), at every code, at every midpoint and one float either side, and at random magnitudes.
TEST(F8E4M3Test, EncodingEqualsAScanOfAllCodes) {
  auto scan = [](float f) -> uint8_t {
    if (std::isnan(f)) return 0x7f;
    const uint8_t sign = std::signbit(f) ? 0x80 : 0;
    const float a = std::fabs(f);
    if (a >= 448.0f) return sign | 0x7e;
    uint8_t best = 0;
    float best_err = a;
    for (int c = 1; c <= 0x7e; ++c) {
      const float err = std::fabs(F8E4M3ToFloat(static_cast<uint8_t>(c)) - a);
      if (err < best_err || (err == best_err && (c & 1) == 0)) {
        best_err = err;
        best = static_cast<uint8_t>(c);
      }
    }
    return sign | best;
  };
  std::vector<float> probes;
  for (int c = 0; c < 0x7e; ++c) {
    const float v = F8E4M3ToFloat(static_cast<uint8_t>(c));
    const float mid = (v + F8E4M3ToFloat(static_cast<uint8_t>(c + 1))) / 2;
    for (float p : {v, mid}) {
      probes.push_back(p);
      probes.push_back(std::nextafter(p, 0.0f));
      probes.push_back(std::nextafter(p, 1000.0f));
    }
  }
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> exponent(-14.0f, 9.5f);
  for (int i = 0; i < 20000; ++i) probes.push_back(std::exp2(exponent(rng)));
  for (float p : probes) {
    ASSERT_EQ(FloatToF8E4M3(p), scan(p)) << p;
    ASSERT_EQ(FloatToF8E4M3(-p), scan(-p)) << -p;
  }
}

TEST(F8E4M3Test, SaturatesAndRoundsToNearestEven) {
  EXPECT_EQ(FloatToF8E4M3(500.0f), 0x7E);
  EXPECT_EQ(FloatToF8E4M3(464.0f), 0x7E);  // halfway to the NaN code: still saturates
  EXPECT_EQ(FloatToF8E4M3(-1000.0f), 0xFE);
  EXPECT_EQ(FloatToF8E4M3(std::numeric_limits<float>::infinity()), 0x7E);
  EXPECT_EQ(FloatToF8E4M3(1.0625f), 0x38);  // halfway 1.0 (even) / 1.125
  EXPECT_EQ(FloatToF8E4M3(1.1875f), 0x3A);  // halfway 1.125 / 1.25 (even)
  EXPECT_EQ(FloatToF8E4M3(1.07f), 0x39);
  EXPECT_EQ(FloatToF8E4M3(Pow2(-10)), 0x00);         // halfway 0 / 2^-9 -> 0
  EXPECT_EQ(FloatToF8E4M3(3.0f * Pow2(-10)), 0x02);  // halfway 2^-9 / 2^-8 -> 2^-8
  // The top binade is 256, 288, ..., 416 (0x7D), 448 (0x7E): ties go to the even code.
  EXPECT_EQ(FloatToF8E4M3(400.0f), 0x7C);  // halfway 384 / 416
  EXPECT_EQ(FloatToF8E4M3(432.0f), 0x7E);  // halfway 416 / 448
}

TEST(F8E4M3Test, EveryCodeRoundTrips) {
  for (int c = 0; c < 256; ++c) {
    if ((c & 0x7F) == 0x7F) continue;  // NaN
    const float f = F8E4M3ToFloat(static_cast<uint8_t>(c));
    ASSERT_EQ(FloatToF8E4M3(f), c) << "code " << c << " -> " << f;
  }
}

// ---- bulk conversion -----------------------------------------------------------------------

TEST(ConvertTest, LittleEndianBytes) {
  const float src[2] = {1.0f, -2.0f};
  uint8_t buf[8];
  ConvertFromF32(DType::kF16, src, 2, buf);
  EXPECT_EQ(buf[0], 0x00);
  EXPECT_EQ(buf[1], 0x3C);
  EXPECT_EQ(buf[2], 0x00);
  EXPECT_EQ(buf[3], 0xC0);
  ConvertFromF32(DType::kBF16, src, 2, buf);
  EXPECT_EQ(buf[0], 0x80);
  EXPECT_EQ(buf[1], 0x3F);
  ConvertFromF32(DType::kF8E4M3, src, 2, buf);
  EXPECT_EQ(buf[0], 0x38);
  EXPECT_EQ(buf[1], 0xC0);  // -2: 1 1000 000
}

TEST(ConvertTest, RoundTripThroughEveryDType) {
  // Values exactly representable in every dtype, so each must come back unchanged.
  const std::vector<float> values = {0.0f, 1.0f, -1.5f, 0.25f, 448.0f, -3.0f, Pow2(-6), 240.0f};
  for (DType dt : {DType::kF32, DType::kF16, DType::kBF16, DType::kF8E4M3}) {
    std::vector<uint8_t> bytes(values.size() * DTypeSize(dt));
    ConvertFromF32(dt, values.data(), values.size(), bytes.data());
    std::vector<float> back(values.size(), -99.0f);
    ConvertToF32(dt, bytes.data(), values.size(), back.data());
    EXPECT_EQ(back, values) << DTypeName(dt);
  }
}

TEST(ConvertTest, LossyDTypesRound) {
  const float third = 1.0f / 3.0f;
  float back = 0;
  uint8_t buf[4];
  ConvertFromF32(DType::kF16, &third, 1, buf);
  ConvertToF32(DType::kF16, buf, 1, &back);
  EXPECT_NE(back, third);
  EXPECT_NEAR(back, third, Pow2(-12));  // half an ulp of [0.25, 0.5)
  ConvertFromF32(DType::kBF16, &third, 1, buf);
  ConvertToF32(DType::kBF16, buf, 1, &back);
  EXPECT_NEAR(back, third, Pow2(-9));
}

// ---- Tensor --------------------------------------------------------------------------------

// The bulk BF16 conversions (vectorised, branch-free) give, element for element, what the
// scalar FloatToBF16 / BF16ToFloat give: every BF16 code, and F32 bit patterns from every
// class (random, ties, NaNs with payloads, infinities, subnormals, values that round up to
// infinity), at lengths around the block size and at odd destination addresses.
TEST(ConvertTest, BulkBF16EqualsTheScalarConversions) {
  std::vector<uint16_t> codes(65536);
  for (size_t i = 0; i < codes.size(); ++i) codes[i] = static_cast<uint16_t>(i);
  std::vector<float> wide(codes.size());
  ConvertToF32(DType::kBF16, codes.data(), codes.size(), wide.data());
  for (size_t i = 0; i < codes.size(); ++i) {
    const float want = BF16ToFloat(codes[i]);
    ASSERT_EQ(std::memcmp(&wide[i], &want, 4), 0) << "code " << i;
  }
  std::mt19937 rng(7);
  std::vector<uint32_t> bits;
  for (uint32_t special : {0x00000000u, 0x80000000u, 0x7f800000u, 0xff800000u, 0x7fc00000u,
                           0x7f800001u, 0xffffffffu, 0x7f7fffffu, 0x00000001u, 0x807fffffu,
                           0x3f808000u, 0x3f818000u, 0x3f807fffu, 0x7fff8000u, 0x7f7f8000u}) {
    bits.push_back(special);
  }
  while (bits.size() < 5000) {
    uint32_t x = static_cast<uint32_t>(rng());
    if (rng() % 4 == 0) x = (x & 0xffff0000u) | 0x8000u;  // an exact tie
    bits.push_back(x);
  }
  for (size_t n : {size_t{1}, size_t{255}, size_t{256}, size_t{257}, size_t{4999}}) {
    for (size_t offset : {size_t{0}, size_t{1}}) {
      std::vector<float> src(n);
      std::memcpy(src.data(), bits.data(), 4 * n);
      std::vector<uint8_t> out(2 * n + 1);
      ConvertFromF32(DType::kBF16, src.data(), n, out.data() + offset);
      for (size_t i = 0; i < n; ++i) {
        uint16_t got;
        std::memcpy(&got, out.data() + offset + 2 * i, 2);
        ASSERT_EQ(got, FloatToBF16(src[i])) << "bits " << std::hex << bits[i] << " n " << n;
      }
      std::vector<float> back(n);
      ConvertToF32(DType::kBF16, out.data() + offset, n, back.data());
      for (size_t i = 0; i < n; ++i) {
        uint16_t code;
        std::memcpy(&code, out.data() + offset + 2 * i, 2);
        const float want = BF16ToFloat(code);
        ASSERT_EQ(std::memcmp(&back[i], &want, 4), 0);
      }
    }
  }
}

TEST(TensorTest, ZerosAndFromVector) {
  Tensor z = Tensor::Zeros({2, 3});
  EXPECT_EQ(z.rank(), 2);
  EXPECT_EQ(z.numel(), 6);
  EXPECT_EQ(z.dim(0), 2);
  EXPECT_EQ(z.dim(-1), 3);
  EXPECT_FALSE(z.empty());
  for (float v : z.span()) EXPECT_EQ(v, 0.0f);
  EXPECT_EQ(z.ShapeString(), "[2, 3]");

  Tensor t = Tensor::FromVector({2, 3}, {1, 2, 3, 4, 5, 6});
  EXPECT_EQ(t.row(1)[0], 4.0f);
  EXPECT_EQ(t.row(1)[2], 6.0f);
  t.mutable_row(0)[1] = 20.0f;
  EXPECT_EQ(t.data()[1], 20.0f);
  EXPECT_TRUE(Tensor().empty());
}

TEST(TensorTest, CopiesShareStorage) {
  Tensor a = Tensor::FromVector({2}, {1, 2});
  Tensor b = a;  // a handle copy
  b.mutable_data()[0] = 7.0f;
  EXPECT_EQ(a.data()[0], 7.0f);
}

TEST(TensorTest, CloneIsDeep) {
  Tensor a = Tensor::FromVector({2, 2}, {1, 2, 3, 4});
  Tensor c = a.Clone();
  EXPECT_EQ(c.shape(), a.shape());
  EXPECT_NE(c.data(), a.data());
  c.mutable_data()[3] = -1.0f;
  EXPECT_EQ(a.data()[3], 4.0f);
  EXPECT_EQ(c.data()[0], 1.0f);
}

TEST(TensorTest, ReshapedSharesStorage) {
  Tensor a = Tensor::FromVector({2, 3}, {1, 2, 3, 4, 5, 6});
  Tensor r = a.Reshaped({3, 2});
  EXPECT_EQ(r.shape(), (std::vector<int64_t>{3, 2}));
  EXPECT_EQ(a.shape(), (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(r.data(), a.data());
  EXPECT_EQ(r.row(1)[0], 3.0f);  // row 1 of [3, 2] starts at element 2
  r.mutable_row(2)[1] = 60.0f;
  EXPECT_EQ(a.row(1)[2], 60.0f);
}

TEST(TensorTest, ViewKeepsOwnerAlive) {
  auto storage = std::make_shared<std::vector<float>>(std::vector<float>{1, 2, 3, 4});
  std::weak_ptr<std::vector<float>> watch = storage;
  Tensor v = Tensor::View({2, 2}, storage->data() + 0, storage);
  storage.reset();
  ASSERT_FALSE(watch.expired()) << "the view must keep its owner alive";
  EXPECT_EQ(v.row(1)[1], 4.0f);
  Tensor r = v.Reshaped({4});
  v = Tensor();
  EXPECT_FALSE(watch.expired()) << "a reshape must keep the owner alive too";
  EXPECT_EQ(r.data()[2], 3.0f);
  r = Tensor();
  EXPECT_TRUE(watch.expired());
}

TEST(TensorTest, ViewOfConstDataIsZeroCopy) {
  static const float kData[3] = {5, 6, 7};
  Tensor v = Tensor::View({3}, kData, nullptr);
  EXPECT_EQ(v.data(), kData);
  EXPECT_EQ(v.numel(), 3);
  Tensor c = v.Clone();
  EXPECT_NE(c.data(), kData);
  EXPECT_EQ(c.data()[2], 7.0f);
}

}  // namespace
}  // namespace moemesh
