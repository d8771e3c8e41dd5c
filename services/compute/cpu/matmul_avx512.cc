// AVX-512F kernels (compiled with -mavx512f -mavx2 -mfma -mf16c; see matmul_internal.h).
#include <immintrin.h>

#include "services/compute/cpu/matmul_internal.h"

namespace moemesh::cpu::internal {
namespace {

// 16 elements starting at p as F32 (p may be a zero-padded copy).
inline __m512 Decode16(DType dtype, const uint8_t* p, float scale256) {
  switch (dtype) {
    case DType::kBF16: {
      const __m512i v =
          _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
      return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    }
    case DType::kF16:
      return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    case DType::kF8E4M3: {
      const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
      const __m256i sign = _mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x80)), 8);
      const __m256i rest = _mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x7f)), 7);
      return _mm512_mul_ps(_mm512_cvtph_ps(_mm256_or_si256(sign, rest)), _mm512_set1_ps(scale256));
    }
    case DType::kF32:
      break;
  }
  return _mm512_loadu_ps(reinterpret_cast<const float*>(p));
}

void DecodeRow(const Weight& w, int64_t j, float* out) {
  const int64_t k = w.cols;
  const int64_t esize = w.dtype == DType::kF8E4M3 ? 1 : 2;
  const uint8_t* p = static_cast<const uint8_t*>(w.data) + j * k * esize;
  const float* scales =
      w.dtype == DType::kF8E4M3
          ? w.scale_inv + (j / w.block_rows) * ((k + w.block_cols - 1) / w.block_cols)
          : nullptr;
  int64_t c = 0;
  for (; c + 16 <= k; c += 16) {
    const float s = scales ? scales[c / w.block_cols] * 256.0f : 0.0f;
    _mm512_storeu_ps(out + c, Decode16(w.dtype, p + c * esize, s));
  }
  if (c < k) {
    alignas(64) uint8_t tmp[64] = {};
    __builtin_memcpy(tmp, p + c * esize, (k - c) * esize);
    const float s = scales ? scales[c / w.block_cols] * 256.0f : 0.0f;
    alignas(64) float f[16];
    _mm512_store_ps(f, Decode16(w.dtype, tmp, s));
    for (int64_t i = 0; i < k - c; ++i) out[c + i] = f[i];
  }
}

// The tile shape of matmul_internal.h. The arithmetic is the AVX2 kernel's (256-bit vectors,
// see matmul_tile.inc), so the two levels agree bitwise.
constexpr int kTileRows = kAvx512TileRows;
constexpr int kTileCols = kAvx512TileCols;
constexpr int kDecodeCols = kAvx512DecodeCols;

#include "services/compute/cpu/matmul_tile.inc"

}  // namespace

void RowsAvx512(const float* x, int64_t m, const Weight& w, int64_t n0, int64_t n1, float* y,
                int64_t ldy, bool accumulate, float* scratch) {
  RowsTiled<kTileRows, kTileCols, kDecodeCols>(x, m, w, n0, n1, y, ldy, accumulate, scratch);
}

}  // namespace moemesh::cpu::internal
