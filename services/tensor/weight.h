// Weight: a 2-D [rows, cols] weight matrix kept in its checkpoint's dtype.
//
// F32, F16 and BF16 weights are row-major elements of that dtype. F8_E4M3 weights are
// row-major bytes plus DeepSeek-style block scales: element (r, c) is worth
// fp8(r, c) × scale_inv[r / block_rows, c / block_cols] (see services/model/fp8.h). Kernels
// (services/compute/cpu/matmul.h) read weights as they are and dequantise inside the tile;
// nothing here ever materialises an F32 copy unless asked (DequantizeRows).
//
// A Weight is a cheap handle: `owner` keeps its bytes alive (an mmap'ed checkpoint file, or a
// buffer converted on load). Its bytes are never written after construction, so any number of
// threads may read it. This header is plain C++17 with no dependencies beyond the standard
// library, so the CUDA backend (.cu, C++17) can include it.
#pragma once

#include <cstdint>
#include <cstring>
#include <memory>

#include "services/tensor/dtype.h"

namespace moemesh {

struct Weight {
  DType dtype = DType::kF32;
  int64_t rows = 0;
  int64_t cols = 0;
  const void* data = nullptr;  // [rows, cols] of dtype
  // F8_E4M3 only: [ceil(rows / block_rows), ceil(cols / block_cols)] f32, row-major.
  const float* scale_inv = nullptr;
  int block_rows = 128;
  int block_cols = 128;
  std::shared_ptr<const void> owner;

  bool empty() const { return data == nullptr; }
  int64_t scale_cols() const { return (cols + block_cols - 1) / block_cols; }
  int64_t scale_rows() const { return (rows + block_rows - 1) / block_rows; }
  // Bytes the weight occupies in memory, scales included.
  int64_t bytes() const {
    int64_t b = rows * cols * static_cast<int64_t>(DTypeBytes(dtype));
    if (dtype == DType::kF8E4M3) b += scale_rows() * scale_cols() * 4;
    return b;
  }
  const float* f32() const { return static_cast<const float*>(data); }
  const uint8_t* bytes_at(int64_t r) const {
    return static_cast<const uint8_t*>(data) + r * cols * DTypeBytes(dtype);
  }
};

// Scalar conversions, exact: every BF16, F16 and E4M3 value is representable in F32. E4M3 codes
// 0x7F and 0xFF (NaN) decode as ±480, as the vectorised kernels do; checkpoints never hold
// them (quantisers saturate at ±448).
inline float Bf16BitsToFloat(uint16_t b) {
  const uint32_t x = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}
// F32 → BF16 bits, rounded to nearest even; a NaN stays a (quiet) NaN.
inline uint16_t FloatToBf16Bits(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40);
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}
inline float HalfBitsToFloat(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t mant = h & 0x3ff;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {
      exp = 127 - 15 + 1;
      while ((mant & 0x400) == 0) {
        mant <<= 1;
        --exp;
      }
      bits = sign | (exp << 23) | ((mant & 0x3ff) << 13);
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
// E4M3 through F16: the bits shifted into an F16 are the value × 2^-8.
inline float Fp8BitsToFloat(uint8_t v) {
  const uint16_t h = static_cast<uint16_t>(((v & 0x80u) << 8) | ((v & 0x7fu) << 7));
  return HalfBitsToFloat(h) * 256.0f;
}

// The dequantised value of element (r, c).
inline float WeightAt(const Weight& w, int64_t r, int64_t c) {
  const uint8_t* p = w.bytes_at(r);
  switch (w.dtype) {
    case DType::kF32: {
      float f;
      std::memcpy(&f, p + 4 * c, 4);
      return f;
    }
    case DType::kBF16: {
      uint16_t b;
      std::memcpy(&b, p + 2 * c, 2);
      return Bf16BitsToFloat(b);
    }
    case DType::kF16: {
      uint16_t b;
      std::memcpy(&b, p + 2 * c, 2);
      return HalfBitsToFloat(b);
    }
    case DType::kF8E4M3:
      return Fp8BitsToFloat(p[c]) *
             w.scale_inv[(r / w.block_rows) * w.scale_cols() + c / w.block_cols];
  }
  return 0.0f;
}

// out[r - r0, :] = weight rows r0 .. r1-1 as F32. out: [r1 - r0, cols] f32.
inline void DequantizeRows(const Weight& w, int64_t r0, int64_t r1, float* out) {
  for (int64_t r = r0; r < r1; ++r) {
    float* o = out + (r - r0) * w.cols;
    if (w.dtype == DType::kF32) {
      std::memcpy(o, w.bytes_at(r), w.cols * 4);
    } else {
      for (int64_t c = 0; c < w.cols; ++c) o[c] = WeightAt(w, r, c);
    }
  }
}

// A weight that views F32 data [rows, cols] kept alive by `owner`.
inline Weight F32Weight(const float* data, int64_t rows, int64_t cols,
                        std::shared_ptr<const void> owner = nullptr) {
  Weight w;
  w.dtype = DType::kF32;
  w.rows = rows;
  w.cols = cols;
  w.data = data;
  w.owner = std::move(owner);
  return w;
}

}  // namespace moemesh
