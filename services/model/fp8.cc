#include "services/model/fp8.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "services/tensor/tensor.h"

namespace moemesh {

std::string Fp8ScaleName(absl::string_view weight_name) {
  return absl::StrCat(weight_name, "_scale_inv");
}

std::vector<int64_t> Fp8ScaleShape(int64_t rows, int64_t cols, int block_rows, int block_cols) {
  return {(rows + block_rows - 1) / block_rows, (cols + block_cols - 1) / block_cols};
}

absl::Status DequantizeFp8Blocks(absl::Span<const uint8_t> fp8, int64_t rows, int64_t cols,
                                 absl::Span<const float> scale_inv,
                                 absl::Span<const int64_t> scale_shape, int block_rows,
                                 int block_cols, float* out) {
  if (block_rows <= 0 || block_cols <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("FP8 block size ", block_rows, "x", block_cols, " is not positive"));
  }
  if (rows < 0 || cols < 0 || static_cast<int64_t>(fp8.size()) != rows * cols) {
    return absl::InvalidArgumentError(
        absl::StrCat("FP8 weight has ", fp8.size(), " bytes, expected ", rows, "x", cols));
  }
  const std::vector<int64_t> want = Fp8ScaleShape(rows, cols, block_rows, block_cols);
  if (scale_shape != absl::Span<const int64_t>(want) ||
      static_cast<int64_t>(scale_inv.size()) != want[0] * want[1]) {
    return absl::InvalidArgumentError(absl::StrCat(
        "scale_inv has shape ", ShapeToString(scale_shape), ", expected ", ShapeToString(want),
        " for a ", rows, "x", cols, " weight in ", block_rows, "x", block_cols, " blocks"));
  }
  float table[256];
  for (int c = 0; c < 256; ++c) table[c] = F8E4M3ToFloat(static_cast<uint8_t>(c));
  const int64_t scale_cols = want[1];
  for (int64_t r = 0; r < rows; ++r) {
    const float* srow = scale_inv.data() + (r / block_rows) * scale_cols;
    const uint8_t* in = fp8.data() + r * cols;
    float* o = out + r * cols;
    for (int64_t c = 0; c < cols; ++c) o[c] = table[in[c]] * srow[c / block_cols];
  }
  return absl::OkStatus();
}

Fp8Blocks QuantizeFp8Blocks(absl::Span<const float> w, int64_t rows, int64_t cols, int block_rows,
                            int block_cols) {
  Fp8Blocks q;
  q.scale_shape = Fp8ScaleShape(rows, cols, block_rows, block_cols);
  q.scale_inv.assign(q.scale_shape[0] * q.scale_shape[1], 1.0f);
  q.data.resize(rows * cols);
  constexpr float kE4M3Max = 448.0f;
  for (int64_t br = 0; br < q.scale_shape[0]; ++br) {
    for (int64_t bc = 0; bc < q.scale_shape[1]; ++bc) {
      const int64_t r0 = br * block_rows, r1 = std::min(rows, r0 + block_rows);
      const int64_t c0 = bc * block_cols, c1 = std::min(cols, c0 + block_cols);
      float amax = 0.0f;
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = c0; c < c1; ++c) amax = std::max(amax, std::fabs(w[r * cols + c]));
      const float s = amax > 0.0f ? amax / kE4M3Max : 1.0f;
      q.scale_inv[br * q.scale_shape[1] + bc] = s;
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = c0; c < c1; ++c) q.data[r * cols + c] = FloatToF8E4M3(w[r * cols + c] / s);
    }
  }
  return q;
}

}  // namespace moemesh
