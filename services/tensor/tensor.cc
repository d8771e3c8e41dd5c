#include "services/tensor/tensor.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "services/tensor/weight.h"

namespace moemesh {

absl::StatusOr<DType> ParseDType(absl::string_view name) {
  if (name == "F32") return DType::kF32;
  if (name == "F16") return DType::kF16;
  if (name == "BF16") return DType::kBF16;
  if (name == "F8_E4M3") return DType::kF8E4M3;
  return absl::InvalidArgumentError(absl::StrCat("unsupported dtype '", name, "'"));
}

absl::string_view DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return "F32";
    case DType::kF16:
      return "F16";
    case DType::kBF16:
      return "BF16";
    case DType::kF8E4M3:
      return "F8_E4M3";
  }
  return "?";
}

size_t DTypeSize(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return 4;
    case DType::kF16:
    case DType::kBF16:
      return 2;
    case DType::kF8E4M3:
      return 1;
  }
  return 0;
}

float HalfToFloat(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t mant = h & 0x3ff;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while ((mant & 0x400) == 0) {
        mant <<= 1;
        --exp;
      }
      mant &= 0x3ff;
      bits = sign | (exp << 23) | (mant << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t FloatToHalf(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = (x >> 16) & 0x8000;
  const uint32_t absx = x & 0x7fffffffu;
  if (absx >= 0x7f800000u) return sign | 0x7c00 | (absx > 0x7f800000u ? 0x200 : 0);  // inf/nan
  if (absx >= 0x477ff000u) return sign | 0x7c00;                                     // overflow
  if (absx < 0x38800000u) {  // subnormal or zero in half: value = m * 2^-24
    float a;
    std::memcpy(&a, &absx, 4);
    return sign | static_cast<uint16_t>(std::nearbyint(a * 16777216.0f));  // ties to even
  }
  uint32_t r = absx - 0x38000000u;  // rebias exponent 127 -> 15
  const uint32_t rem = r & 0x1fff;
  r >>= 13;
  if (rem > 0x1000 || (rem == 0x1000 && (r & 1))) ++r;
  return sign | static_cast<uint16_t>(r);
}

float BF16ToFloat(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t FloatToBF16(float f) { return FloatToBf16Bits(f); }

float F8E4M3ToFloat(uint8_t v) {
  const float sign = (v & 0x80) ? -1.0f : 1.0f;
  const int exp = (v >> 3) & 0xf;
  const int mant = v & 0x7;
  if (exp == 0xf && mant == 0x7) return std::nanf("");
  if (exp == 0) return sign * std::ldexp(static_cast<float>(mant), -9);  // subnormal: m/8 * 2^-6
  return sign * std::ldexp(1.0f + mant / 8.0f, exp - 7);
}

uint8_t FloatToF8E4M3(float f) {
  if (std::isnan(f)) return 0x7f;
  const uint8_t sign = std::signbit(f) ? 0x80 : 0;
  const float a = std::fabs(f);
  if (a >= 448.0f) return sign | 0x7e;  // saturate at the largest finite value
  // The 127 non-negative finite codes increase with their value, so the nearest is one of the
  // two codes around a (binary search); ties go to the even code. Exact, like a scan of all
  // codes, and fast enough to quantise a model's worth of weights.
  static const auto* values = [] {
    auto* v = new std::array<float, 0x7f>;
    for (int c = 0; c < 0x7f; ++c) (*v)[c] = F8E4M3ToFloat(static_cast<uint8_t>(c));
    return v;
  }();
  // hi: the first code whose value is >= a (a < 448, so hi <= 0x7e).
  const int hi =
      static_cast<int>(std::lower_bound(values->begin(), values->end(), a) - values->begin());
  if (hi == 0 || (*values)[hi] == a) return sign | static_cast<uint8_t>(hi);
  const int lo = hi - 1;
  const float dlo = a - (*values)[lo], dhi = (*values)[hi] - a;
  const int best = dlo < dhi ? lo : dhi < dlo ? hi : (lo % 2 == 0 ? lo : hi);
  return sign | static_cast<uint8_t>(best);
}

namespace {
// Elements per block of the BF16 conversions (their scratch stays in L1).
constexpr size_t kConvertBlock = 256;
}  // namespace

void ConvertToF32(DType dtype, const void* src, size_t n, float* dst) {
  const auto* b = static_cast<const uint8_t*>(src);
  switch (dtype) {
    case DType::kF32:
      std::memcpy(dst, src, n * 4);
      return;
    case DType::kF16:
      for (size_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, b + 2 * i, 2);
        dst[i] = HalfToFloat(h);
      }
      return;
    case DType::kBF16: {
      // In blocks through aligned scratch, so that the loop vectorises (the message bytes this
      // decodes may sit at any address): a shift per element.
      uint16_t in[kConvertBlock];
      for (size_t i0 = 0; i0 < n; i0 += kConvertBlock) {
        const size_t m = std::min(kConvertBlock, n - i0);
        std::memcpy(in, b + 2 * i0, 2 * m);
#pragma omp simd
        for (size_t i = 0; i < m; ++i) {
          const uint32_t bits = static_cast<uint32_t>(in[i]) << 16;
          std::memcpy(dst + i0 + i, &bits, 4);
        }
      }
      return;
    }
    case DType::kF8E4M3: {
      float table[256];
      for (int c = 0; c < 256; ++c) table[c] = F8E4M3ToFloat(static_cast<uint8_t>(c));
      for (size_t i = 0; i < n; ++i) dst[i] = table[b[i]];
      return;
    }
  }
}

void ConvertFromF32(DType dtype, const float* src, size_t n, void* dst) {
  auto* b = static_cast<uint8_t*>(dst);
  switch (dtype) {
    case DType::kF32:
      std::memcpy(dst, src, n * 4);
      return;
    case DType::kF16:
      for (size_t i = 0; i < n; ++i) {
        const uint16_t h = FloatToHalf(src[i]);
        std::memcpy(b + 2 * i, &h, 2);
      }
      return;
    case DType::kBF16: {
      // FloatToBF16 without branches, in blocks through aligned scratch so that it vectorises.
      uint16_t out[kConvertBlock];
      for (size_t i0 = 0; i0 < n; i0 += kConvertBlock) {
        const size_t m = std::min(kConvertBlock, n - i0);
#pragma omp simd
        for (size_t i = 0; i < m; ++i) {
          uint32_t x;
          std::memcpy(&x, src + i0 + i, 4);
          const uint32_t rounded = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
          const uint32_t quiet_nan = (x >> 16) | 0x40u;
          out[i] = static_cast<uint16_t>((x & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
        }
        std::memcpy(b + 2 * i0, out, 2 * m);
      }
      return;
    }
    case DType::kF8E4M3:
      for (size_t i = 0; i < n; ++i) b[i] = FloatToF8E4M3(src[i]);
      return;
  }
}

int64_t Tensor::numel() const {
  int64_t n = 1;
  for (int64_t d : shape_) n *= d;
  return n;
}

Tensor Tensor::Zeros(std::vector<int64_t> shape) {
  Tensor t;
  t.shape_ = std::move(shape);
  const int64_t n = t.numel();
  auto buf = std::shared_ptr<float[]>(new float[n > 0 ? n : 1]());
  t.data_ = buf.get();
  t.owner_ = std::shared_ptr<const void>(buf, buf.get());
  return t;
}

Tensor Tensor::Uninitialized(std::vector<int64_t> shape) {
  Tensor t;
  t.shape_ = std::move(shape);
  const int64_t n = t.numel();
  auto buf = std::shared_ptr<float[]>(new float[n > 0 ? n : 1]);
  t.data_ = buf.get();
  t.owner_ = std::shared_ptr<const void>(buf, buf.get());
  return t;
}

Tensor Tensor::FromVector(std::vector<int64_t> shape, std::vector<float> values) {
  Tensor t;
  t.shape_ = std::move(shape);
  auto holder = std::make_shared<std::vector<float>>(std::move(values));
  if (holder->empty()) holder->resize(1);
  t.data_ = holder->data();
  t.owner_ = holder;
  return t;
}

Tensor Tensor::View(std::vector<int64_t> shape, const float* data,
                    std::shared_ptr<const void> owner) {
  Tensor t;
  t.shape_ = std::move(shape);
  t.data_ = const_cast<float*>(data);
  t.owner_ = std::move(owner);
  return t;
}

Tensor Tensor::Reshaped(std::vector<int64_t> shape) const {
  Tensor t = *this;
  t.shape_ = std::move(shape);
  return t;
}

Tensor Tensor::Clone() const {
  Tensor t = Zeros(shape_);
  if (numel() > 0) std::memcpy(t.data_, data_, numel() * sizeof(float));
  return t;
}

std::string ShapeToString(absl::Span<const int64_t> shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

std::string Tensor::ShapeString() const { return ShapeToString(shape_); }

}  // namespace moemesh
