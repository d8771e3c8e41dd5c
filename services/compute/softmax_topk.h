// Softmax top-k gating on the host, with Mixtral's semantics (see ComputeBackend::SoftmaxTopK).
// Header-only so that every backend (the CPU one, and the CUDA one in its own shared library)
// runs literally the same code and so breaks ties identically.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

namespace moemesh {

// logits: [t, e]; writes ids/weights [t, k] in descending weight, ties to the lower id.
inline void SoftmaxTopKHost(const float* logits, int64_t t, int64_t e, int k, bool renormalize,
                            int32_t* ids, float* weights) {
  std::vector<float> p(e);
  std::vector<int32_t> order(e);
  for (int64_t r = 0; r < t; ++r) {
    const float* l = logits + r * e;
    const float mx = *std::max_element(l, l + e);
    float sum = 0;
    for (int64_t i = 0; i < e; ++i) sum += (p[i] = std::exp(l[i] - mx));
    for (int64_t i = 0; i < e; ++i) p[i] /= sum;
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + k, order.end(),
                      [&](int32_t a, int32_t b) { return p[a] > p[b] || (p[a] == p[b] && a < b); });
    float chosen = 0;
    for (int i = 0; i < k; ++i) chosen += p[order[i]];
    for (int i = 0; i < k; ++i) {
      ids[r * k + i] = order[i];
      weights[r * k + i] = renormalize ? p[order[i]] / chosen : p[order[i]];
    }
  }
}

}  // namespace moemesh
