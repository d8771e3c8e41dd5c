// AVX2 + FMA + F16C kernels (compiled with -mavx2 -mfma -mf16c; see matmul_internal.h).
#include <immintrin.h>

#include "services/compute/cpu/matmul_internal.h"

namespace moemesh::cpu::internal {
namespace {

// 8 elements starting at p as F32 (p may be a zero-padded copy).
inline __m256 Decode8(DType dtype, const uint8_t* p, float scale256) {
  switch (dtype) {
    case DType::kBF16: {
      const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
      return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    }
    case DType::kF16:
      return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    case DType::kF8E4M3: {
      const __m128i b = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
      const __m128i sign = _mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x80)), 8);
      const __m128i rest = _mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x7f)), 7);
      return _mm256_mul_ps(_mm256_cvtph_ps(_mm_or_si128(sign, rest)), _mm256_set1_ps(scale256));
    }
    case DType::kF32:
      break;
  }
  return _mm256_loadu_ps(reinterpret_cast<const float*>(p));
}

// Weight row j as F32 into out[0 .. cols).
void DecodeRow(const Weight& w, int64_t j, float* out) {
  const int64_t k = w.cols;
  const int64_t esize = w.dtype == DType::kF8E4M3 ? 1 : 2;
  const uint8_t* p = static_cast<const uint8_t*>(w.data) + j * k * esize;
  const float* scales =
      w.dtype == DType::kF8E4M3
          ? w.scale_inv + (j / w.block_rows) * ((k + w.block_cols - 1) / w.block_cols)
          : nullptr;
  int64_t c = 0;
  for (; c + 8 <= k; c += 8) {
    const float s = scales ? scales[c / w.block_cols] * 256.0f : 0.0f;
    _mm256_storeu_ps(out + c, Decode8(w.dtype, p + c * esize, s));
  }
  if (c < k) {
    alignas(32) uint8_t tmp[32] = {};
    __builtin_memcpy(tmp, p + c * esize, (k - c) * esize);
    const float s = scales ? scales[c / w.block_cols] * 256.0f : 0.0f;
    alignas(32) float f[8];
    _mm256_store_ps(f, Decode8(w.dtype, tmp, s));
    for (int64_t i = 0; i < k - c; ++i) out[c + i] = f[i];
  }
}

// 16 registers: a 4 × 3 tile holds 12 accumulators, 3 weight slices and 1 x slice; one x row
// against 4 weight rows holds 4 + 4 + 1.
constexpr int kTileRows = 4;
constexpr int kTileCols = 3;
constexpr int kDecodeCols = 8;

#include "services/compute/cpu/matmul_tile.inc"

}  // namespace

void RowsAvx2(const float* x, int64_t m, const Weight& w, int64_t n0, int64_t n1, float* y,
              int64_t ldy, bool accumulate, float* scratch) {
  RowsTiled<kTileRows, kTileCols, kDecodeCols>(x, m, w, n0, n1, y, ldy, accumulate, scratch);
}

float DotAvx2(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 8 <= n; c += 8)
    acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + c), _mm256_loadu_ps(b + c), acc);
  if (c < n) {
    const __m256i m = TailMask8(n - c);
    acc = _mm256_fmadd_ps(_mm256_maskload_ps(a + c, m), _mm256_maskload_ps(b + c, m), acc);
  }
  return Reduce8(acc);
}

void AxpyAvx2(float alpha, const float* x, float* y, int64_t n) {
  const __m256 a = _mm256_set1_ps(alpha);
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    _mm256_storeu_ps(y + c, _mm256_fmadd_ps(a, _mm256_loadu_ps(x + c), _mm256_loadu_ps(y + c)));
  }
  if (c < n) {
    const __m256i m = TailMask8(n - c);
    _mm256_maskstore_ps(
        y + c, m, _mm256_fmadd_ps(a, _mm256_maskload_ps(x + c, m), _mm256_maskload_ps(y + c, m)));
  }
}

// Four key rows at a time (four independent FMA chains instead of one whose latency bounds a
// 64-wide dot product); each chain is DotAvx2's.
void DotRowsAvx2(const float* q, const float* k, int64_t k_stride, int64_t rows, int64_t n,
                 float scale, float* out) {
  const int64_t full = n / 8 * 8;
  const __m256i tail = TailMask8(n - full);
  int64_t j = 0;
  for (; j + 4 <= rows; j += 4) {
    const float* k0 = k + j * k_stride;
    __m256 a[4];
    for (int r = 0; r < 4; ++r) a[r] = _mm256_setzero_ps();
    for (int64_t c = 0; c < full; c += 8) {
      const __m256 qv = _mm256_loadu_ps(q + c);
      _Pragma("GCC unroll 8") for (int r = 0; r < 4; ++r) {
        a[r] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + r * k_stride + c), a[r]);
      }
    }
    if (full < n) {
      const __m256 qv = _mm256_maskload_ps(q + full, tail);
      _Pragma("GCC unroll 8") for (int r = 0; r < 4; ++r) {
        a[r] = _mm256_fmadd_ps(qv, _mm256_maskload_ps(k0 + r * k_stride + full, tail), a[r]);
      }
    }
    _Pragma("GCC unroll 8") for (int r = 0; r < 4; ++r) out[j + r] = Reduce8(a[r]) * scale;
  }
  for (; j < rows; ++j) out[j] = DotAvx2(q, k + j * k_stride, n) * scale;
}

namespace {

// y[0, 8G) (its first `valid` floats; the rest untouched) accumulated over every value row in
// registers: per element the same fused multiply-adds, in the same order, as AxpyAvx2 row by row.
template <int G>
void AxpyRowsBlock(const float* p, float scale, const float* v, int64_t v_stride, int64_t rows,
                   int64_t valid, float* y) {
  const bool masked = valid < 8 * G;
  const __m256i last = TailMask8(valid - 8 * (G - 1));
  __m256 acc[G];
  _Pragma("GCC unroll 8") for (int g = 0; g < G; ++g) {
    acc[g] =
        masked && g == G - 1 ? _mm256_maskload_ps(y + 8 * g, last) : _mm256_loadu_ps(y + 8 * g);
  }
  for (int64_t j = 0; j < rows; ++j) {
    const __m256 a = _mm256_set1_ps(p[j] * scale);
    const float* vj = v + j * v_stride;
    _Pragma("GCC unroll 8") for (int g = 0; g < G; ++g) {
      const __m256 xv =
          masked && g == G - 1 ? _mm256_maskload_ps(vj + 8 * g, last) : _mm256_loadu_ps(vj + 8 * g);
      acc[g] = _mm256_fmadd_ps(a, xv, acc[g]);
    }
  }
  _Pragma("GCC unroll 8") for (int g = 0; g < G; ++g) {
    if (masked && g == G - 1) {
      _mm256_maskstore_ps(y + 8 * g, last, acc[g]);
    } else {
      _mm256_storeu_ps(y + 8 * g, acc[g]);
    }
  }
}

// AxpyRowsBlock<groups> for run-time 1 <= groups <= G.
template <int G>
void AxpyRowsAny(int64_t groups, const float* p, float scale, const float* v, int64_t v_stride,
                 int64_t rows, int64_t valid, float* y) {
  if constexpr (G > 1) {
    if (groups < G) return AxpyRowsAny<G - 1>(groups, p, scale, v, v_stride, rows, valid, y);
  }
  AxpyRowsBlock<G>(p, scale, v, v_stride, rows, valid, y);
}

}  // namespace

// y in blocks of up to 64 floats (8 accumulators), each block over all value rows.
void AxpyRowsAvx2(const float* p, float scale, const float* v, int64_t v_stride, int64_t rows,
                  int64_t n, float* y) {
  for (int64_t d = 0; d < n; d += 64) {
    const int64_t valid = n - d < 64 ? n - d : 64;
    AxpyRowsAny<8>((valid + 7) / 8, p, scale, v + d, v_stride, rows, valid, y + d);
  }
}

void RowsAvx2WithAvx512Tiles(const float* x, int64_t m, const Weight& w, int64_t n0, int64_t n1,
                             float* y, int64_t ldy, bool accumulate, float* scratch) {
  RowsTiled<kAvx512TileRows, kAvx512TileCols, kAvx512DecodeCols>(x, m, w, n0, n1, y, ldy,
                                                                 accumulate, scratch);
}

}  // namespace moemesh::cpu::internal
