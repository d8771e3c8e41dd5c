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

namespace {

// Exp (matmul.cc) on 8 lanes: the same operations in the same order, so the same bits.
inline __m256 Exp8(__m256 x) {
  const __m256 xc = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(kExpMin)),
                                  _mm256_set1_ps(kExpMax));  // NaN lanes become kExpMin
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kExpPoly[0]);
  _Pragma("GCC unroll 8") for (int i = 1; i < 6; ++i) {
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpPoly[i]));
  }
  const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
  const __m256i bits =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  __m256 e = _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
  e = _mm256_blendv_ps(e, _mm256_set1_ps(__builtin_inff()),
                       _mm256_cmp_ps(x, _mm256_set1_ps(kExpMax), _CMP_GT_OQ));
  e = _mm256_blendv_ps(e, _mm256_setzero_ps(),
                       _mm256_cmp_ps(x, _mm256_set1_ps(kExpMin), _CMP_LT_OQ));
  return _mm256_blendv_ps(e, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

inline __m256 SiluMul8(__m256 g, __m256 u) {
  const __m256 e = Exp8(_mm256_xor_ps(g, _mm256_set1_ps(-0.0f)));
  return _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e)), u);
}

}  // namespace

void SiluMulAvx2(const float* gate, const float* up, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(out + i, SiluMul8(_mm256_loadu_ps(gate + i), _mm256_loadu_ps(up + i)));
  }
  if (i < n) {
    const __m256i m = TailMask8(n - i);
    _mm256_maskstore_ps(out + i, m,
                        SiluMul8(_mm256_maskload_ps(gate + i, m), _mm256_maskload_ps(up + i, m)));
  }
}

float ExpShiftSumAvx2(float* s, int64_t n, float shift) {
  const __m256 sh = _mm256_set1_ps(shift);
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = Exp8(_mm256_sub_ps(_mm256_loadu_ps(s + i), sh));
    _mm256_storeu_ps(s + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  if (i < n) {
    const __m256i m = TailMask8(n - i);
    const __m256 e = _mm256_and_ps(Exp8(_mm256_sub_ps(_mm256_maskload_ps(s + i, m), sh)),
                                   _mm256_castsi256_ps(m));
    _mm256_maskstore_ps(s + i, m, e);
    acc = _mm256_add_ps(acc, e);
  }
  return Reduce8(acc);
}

namespace {

// y_r[0, 8G) (the first `valid` floats) for R query rows, over value rows [j0, j1) with weights
// p_r[j] * scales[r]: per element AxpyAvx2's fused multiply-adds in increasing j (the rows'
// accumulators stay in registers over all value rows); a value slice loaded once serves all R
// rows.
template <int R, int G>
void AxpyMultiBlock(const float* p, int64_t ld, const float* scales, const float* v,
                    int64_t v_stride, int64_t j0, int64_t j1, int64_t valid, float* y,
                    int64_t y_stride) {
  const bool masked = valid < 8 * G;
  const __m256i last = TailMask8(valid - 8 * (G - 1));
  __m256 acc[R][G];
  _Pragma("GCC unroll 16") for (int r = 0; r < R; ++r) {
    _Pragma("GCC unroll 16") for (int g = 0; g < G; ++g) {
      const float* yr = y + r * y_stride + 8 * g;
      acc[r][g] = masked && g == G - 1 ? _mm256_maskload_ps(yr, last) : _mm256_loadu_ps(yr);
    }
  }
  for (int64_t j = j0; j < j1; ++j) {
    const float* vj = v + j * v_stride;
    __m256 xv[G];
    _Pragma("GCC unroll 16") for (int g = 0; g < G; ++g) {
      xv[g] =
          masked && g == G - 1 ? _mm256_maskload_ps(vj + 8 * g, last) : _mm256_loadu_ps(vj + 8 * g);
    }
    _Pragma("GCC unroll 16") for (int r = 0; r < R; ++r) {
      const __m256 a = _mm256_set1_ps(p[r * ld + j] * scales[r]);
      _Pragma("GCC unroll 16") for (int g = 0; g < G; ++g) {
        acc[r][g] = _mm256_fmadd_ps(a, xv[g], acc[r][g]);
      }
    }
  }
  _Pragma("GCC unroll 16") for (int r = 0; r < R; ++r) {
    _Pragma("GCC unroll 16") for (int g = 0; g < G; ++g) {
      float* yr = y + r * y_stride + 8 * g;
      if (masked && g == G - 1) {
        _mm256_maskstore_ps(yr, last, acc[r][g]);
      } else {
        _mm256_storeu_ps(yr, acc[r][g]);
      }
    }
  }
}

template <int R, int G>
void AxpyMultiAny(int64_t r, int64_t groups, const float* p, int64_t ld, const float* scales,
                  const float* v, int64_t v_stride, int64_t j0, int64_t j1, int64_t valid, float* y,
                  int64_t y_stride) {
  if constexpr (R > 1) {
    if (r < R) {
      return AxpyMultiAny<R - 1, G>(r, groups, p, ld, scales, v, v_stride, j0, j1, valid, y,
                                    y_stride);
    }
  }
  if constexpr (G > 1) {
    if (groups < G) {
      return AxpyMultiAny<R, G - 1>(r, groups, p, ld, scales, v, v_stride, j0, j1, valid, y,
                                    y_stride);
    }
  }
  AxpyMultiBlock<R, G>(p, ld, scales, v, v_stride, j0, j1, valid, y, y_stride);
}

}  // namespace

// The matrix products' tile (kTileRows query rows × kTileCols key rows) over the rows' strides,
// then the scale: each score is DotAvx2's operations (acc = fma(q, k, acc) per 8 columns, the
// last chunk zero-padded, Reduce8), times scale.
void DotRowsMultiAvx2(const float* q, int64_t q_stride, int64_t nq, const float* k,
                      int64_t k_stride, int64_t rows, int64_t n, float scale, float* out,
                      int64_t ld) {
  Prefetch none;
  for (int64_t r = 0; r < nq; r += kTileRows) {
    const int64_t tr = nq - r < kTileRows ? nq - r : kTileRows;
    for (int64_t j = 0; j < rows; j += kTileCols) {
      const int64_t tj = rows - j < kTileCols ? rows - j : kTileCols;
      TileAny<kTileRows, kTileCols>(tr, tj, q + r * q_stride, q_stride,
                                    reinterpret_cast<const uint8_t*>(k + j * k_stride), k_stride, n,
                                    out + r * ld + j, ld, false, none);
    }
  }
  for (int64_t r = 0; r < nq; ++r) {
    for (int64_t j = 0; j < rows; ++j) out[r * ld + j] *= scale;
  }
}

// Blocks of 4 query rows × 24 floats of y (12 accumulators): the value rows every query row of
// the block uses are swept once for all of them, then each row's own further rows alone (the
// order per element is still increasing j).
void AxpyRowsMultiAvx2(const float* p, int64_t ld, const float* scales, const int64_t* rows,
                       int64_t nq, const float* v, int64_t v_stride, int64_t n, float* y,
                       int64_t y_stride) {
  for (int64_t r0 = 0; r0 < nq; r0 += 4) {
    const int64_t tr = nq - r0 < 4 ? nq - r0 : 4;
    int64_t common = rows[r0];
    for (int64_t r = r0 + 1; r < r0 + tr; ++r) common = rows[r] < common ? rows[r] : common;
    for (int64_t d = 0; d < n; d += 24) {
      const int64_t valid = n - d < 24 ? n - d : 24;
      const int64_t groups = (valid + 7) / 8;
      AxpyMultiAny<4, 3>(tr, groups, p + r0 * ld, ld, scales + r0, v + d, v_stride, 0, common,
                         valid, y + r0 * y_stride + d, y_stride);
      for (int64_t r = r0; r < r0 + tr; ++r) {
        if (rows[r] > common) {
          AxpyMultiAny<1, 3>(1, groups, p + r * ld, ld, scales + r, v + d, v_stride, common,
                             rows[r], valid, y + r * y_stride + d, y_stride);
        }
      }
    }
  }
}

void RowsAvx2WithAvx512Tiles(const float* x, int64_t m, const Weight& w, int64_t n0, int64_t n1,
                             float* y, int64_t ldy, bool accumulate, float* scratch) {
  RowsTiled<kAvx512TileRows, kAvx512TileCols, kAvx512DecodeCols>(x, m, w, n0, n1, y, ldy,
                                                                 accumulate, scratch);
}

}  // namespace moemesh::cpu::internal
