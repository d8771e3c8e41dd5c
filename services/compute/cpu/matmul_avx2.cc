// AVX2 + FMA + F16C kernels (compiled with -mavx2 -mfma -mf16c; see matmul_internal.h).
#include <immintrin.h>

#include "services/compute/cpu/matmul_internal.h"

namespace moemesh::cpu::internal {
namespace {

// Lanes 0-7 in a0, 8-15 in a1, reduced in the canonical order of ReduceLanes.
inline float Reduce(__m256 a0, __m256 a1) {
  const __m256 t = _mm256_add_ps(a0, a1);
  const __m128 u = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
  const __m128 v = _mm_add_ps(u, _mm_movehl_ps(u, u));
  return _mm_cvtss_f32(_mm_add_ss(v, _mm_movehdup_ps(v)));
}

inline __m256i TailMask(int64_t valid) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(valid)), idx);
}

// out[r] = dot(x[r * ldx ..], w) for r < R, over k columns.
template <int R>
inline void DotTile(const float* x, int64_t ldx, int64_t k, const float* w, float* out) {
  __m256 a0[R], a1[R];
  for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 16 <= k; c += 16) {
    const __m256 w0 = _mm256_loadu_ps(w + c), w1 = _mm256_loadu_ps(w + c + 8);
    for (int r = 0; r < R; ++r) {
      a0[r] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * ldx + c), w0, a0[r]);
      a1[r] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * ldx + c + 8), w1, a1[r]);
    }
  }
  if (c < k) {  // zero-padded last chunk
    const __m256i m0 = TailMask(k - c), m1 = TailMask(k - c - 8);
    const __m256 w0 = _mm256_maskload_ps(w + c, m0), w1 = _mm256_maskload_ps(w + c + 8, m1);
    for (int r = 0; r < R; ++r) {
      a0[r] = _mm256_fmadd_ps(_mm256_maskload_ps(x + r * ldx + c, m0), w0, a0[r]);
      a1[r] = _mm256_fmadd_ps(_mm256_maskload_ps(x + r * ldx + c + 8, m1), w1, a1[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = Reduce(a0[r], a1[r]);
}

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

}  // namespace

void RowsAvx2(const float* x, int64_t m, const Weight& w, int64_t n0, int64_t n1, float* y,
              int64_t ldy, bool accumulate, float* scratch) {
  const int64_t k = w.cols;
  constexpr int kR = 4;
  // Few rows: one weight row at a time (dequantised into L1). More rows: panels of kPanelRows
  // weight rows, so that a tile of x rows is reused over the whole panel while in cache.
  // Either way each output is one DotTile in the canonical order.
  const int64_t panel = m > kR ? kPanelRows : 1;
  float out[kR];
  auto store = [&](int64_t i, int64_t j, int64_t rows) {
    for (int64_t r = 0; r < rows; ++r) {
      float& d = y[(i + r) * ldy + j];
      d = accumulate ? d + out[r] : out[r];
    }
  };
  for (int64_t j0 = n0; j0 < n1; j0 += panel) {
    const int64_t j1 = j0 + panel < n1 ? j0 + panel : n1;
    const float* wp;
    if (w.dtype == DType::kF32) {
      wp = static_cast<const float*>(w.data) + j0 * k;
    } else {
      for (int64_t j = j0; j < j1; ++j) DecodeRow(w, j, scratch + (j - j0) * k);
      wp = scratch;
    }
    int64_t i = 0;
    for (; i + kR <= m; i += kR) {
      for (int64_t j = j0; j < j1; ++j) {
        DotTile<kR>(x + i * k, k, k, wp + (j - j0) * k, out);
        store(i, j, kR);
      }
    }
    if (i == m) continue;
    const float* xi = x + i * k;
    for (int64_t j = j0; j < j1; ++j) {
      const float* wr = wp + (j - j0) * k;
      switch (m - i) {
        case 3:
          DotTile<3>(xi, k, k, wr, out);
          break;
        case 2:
          DotTile<2>(xi, k, k, wr, out);
          break;
        case 1:
          DotTile<1>(xi, k, k, wr, out);
          break;
        default:
          break;
      }
      store(i, j, m - i);
    }
  }
}

}  // namespace moemesh::cpu::internal
