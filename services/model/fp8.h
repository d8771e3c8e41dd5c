// FP8 E4M3 weights with 128×128 block scales, as in the DeepSeek-V3/R1 checkpoints.
//
// A quantised 2-D weight "X.weight" [rows, cols] is stored as F8_E4M3 next to a float32
// "X.weight_scale_inv" of shape [ceil(rows / block_rows), ceil(cols / block_cols)]; the real
// value of element (r, c) is fp8(r, c) × scale_inv[r / block_rows, c / block_cols] (DeepSeek's
// inference/kernel.py weight_dequant). Blocks at the right and bottom edges may be partial.
// Checkpoint::LoadF32 dequantises such weights transparently; the model generator quantises
// with QuantizeFp8Blocks. Pure functions, thread-safe.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace moemesh {

inline constexpr int kDefaultFp8BlockSize = 128;

// "X.weight" -> "X.weight_scale_inv".
std::string Fp8ScaleName(absl::string_view weight_name);

// [ceil(rows / block_rows), ceil(cols / block_cols)].
std::vector<int64_t> Fp8ScaleShape(int64_t rows, int64_t cols, int block_rows, int block_cols);

// out[r, c] = F8E4M3ToFloat(fp8[r * cols + c]) * scale_inv[r / block_rows, c / block_cols].
// fp8: [rows, cols] bytes; scale_inv: row-major with shape `scale_shape`, which must equal
// Fp8ScaleShape(...) (INVALID_ARGUMENT naming both shapes otherwise); out: [rows, cols].
[[nodiscard]] absl::Status DequantizeFp8Blocks(absl::Span<const uint8_t> fp8, int64_t rows,
                                               int64_t cols, absl::Span<const float> scale_inv,
                                               absl::Span<const int64_t> scale_shape,
                                               int block_rows, int block_cols, float* out);

// Block-wise quantisation: each block's scale_inv is its largest |value| / 448 (the E4M3
// maximum; 1 for an all-zero block), and each element is rounded to E4M3 after dividing by it.
struct Fp8Blocks {
  std::vector<uint8_t> data;     // [rows, cols] E4M3
  std::vector<float> scale_inv;  // scale_shape, row-major
  std::vector<int64_t> scale_shape;
};
Fp8Blocks QuantizeFp8Blocks(absl::Span<const float> w, int64_t rows, int64_t cols,
                            int block_rows = kDefaultFp8BlockSize,
                            int block_cols = kDefaultFp8BlockSize);

}  // namespace moemesh
