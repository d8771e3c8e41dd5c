// LocalExpertGroup with DeviceExperts attached, on any machine: what the group hands the device
// (the batch's rows through its row index, offsets, experts, weights) and what it keeps (its
// NOT_FOUND answers; no host weights, so the checkpoint's mapping goes with the checkpoint).
// The device here is a test double that computes on the host with the same weights, through
// the DeviceExperts interface; the CUDA implementation is checked against the CPU group in
// tests/gpu/gpu_expert_group_test.cc and tools/gpu/gpu_experts_check.cc on a GPU.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "services/compute/backend.h"
#include "services/compute/device_experts.h"
#include "services/model/config.h"
#include "services/model/safetensors.h"
#include "services/moe/local_expert_group.h"
#include "tests/test_util.h"

namespace moemesh {
namespace {

using ::moemesh::testing::RandomFloats;
using ::moemesh::testing::TempDir;

// Computes each call in double over copies of the weights it was given, and records the calls.
class HostDevice final : public DeviceExperts {
 public:
  explicit HostDevice(const std::vector<DeviceExpertWeights>& experts) {
    for (const DeviceExpertWeights& e : experts) {
      Copy c;
      c.layer = e.layer;
      c.expert = e.expert;
      c.inter = e.w1.rows;
      c.hidden = e.w1.cols;
      for (const Weight* w : {&e.w1, &e.w3, &e.w2}) {
        std::vector<float> f(w->rows * w->cols);
        DequantizeRows(*w, 0, w->rows, f.data());
        c.w.push_back(std::move(f));
      }
      copies_.push_back(std::move(c));
    }
  }
  std::string device() const override { return "host double"; }
  int64_t weight_bytes() const override { return 0; }
  std::string compute_dtype() const override { return "f32"; }
  std::string gemm() const override { return "none"; }
  bool Run(const DeviceExpertCall& call, std::string* error, DeviceExpertsTiming*) override {
    ++calls;
    const int64_t hidden = copies_.empty() ? 0 : copies_[0].hidden;
    for (int64_t i = 0; i < call.num_tokens; ++i) {
      std::vector<double> acc(hidden, 0.0);
      for (int32_t j = call.offsets[i]; j < call.offsets[i + 1]; ++j) {
        const Copy* c = Find(call.layer, call.experts[j]);
        if (c == nullptr) {
          *error = "not held";
          return false;
        }
        std::vector<double> a(c->inter);
        for (int64_t r = 0; r < c->inter; ++r) {
          double g = 0, u = 0;
          for (int64_t k = 0; k < hidden; ++k) {
            g += c->w[0][r * hidden + k] * static_cast<double>(call.token_rows[i][k]);
            u += c->w[1][r * hidden + k] * static_cast<double>(call.token_rows[i][k]);
          }
          a[r] = g / (1.0 + std::exp(-g)) * u;
        }
        for (int64_t h = 0; h < hidden; ++h) {
          double y = 0;
          for (int64_t r = 0; r < c->inter; ++r) y += c->w[2][h * c->inter + r] * a[r];
          acc[h] += call.weights[j] * y;
        }
      }
      for (int64_t h = 0; h < hidden; ++h) call.out[i * hidden + h] = static_cast<float>(acc[h]);
    }
    return true;
  }
  int calls = 0;

 private:
  struct Copy {
    int32_t layer = 0, expert = 0;
    int64_t inter = 0, hidden = 0;
    std::vector<std::vector<float>> w;  // w1, w3, w2 as F32
  };
  const Copy* Find(int32_t layer, int32_t expert) const {
    for (const Copy& c : copies_) {
      if (c.layer == layer && c.expert == expert) return &c;
    }
    return nullptr;
  }
  std::vector<Copy> copies_;
};

TEST(DeviceExpertsGroupTest, TheDeviceGetsTheBatchAndTheHostWeightsGo) {
  TempDir dir;
  const std::string model = moemesh::testing::MakeSmallModel(dir);
  auto cfg = LoadModelConfig(model);
  ASSERT_TRUE(cfg.ok()) << cfg.status();
  auto ckpt = Checkpoint::Open(model);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  std::vector<ExpertKey> keys;
  for (int e = 0; e < cfg->num_experts; e += 2) keys.push_back({1, e});  // even experts of layer 1
  auto backend = MakeCpuBackend();

  // Tokens by row index into a larger tensor, as the dispatcher sends them; tokens with two
  // experts, one, and none.
  const int64_t hidden = cfg->hidden_size;
  ExpertBatch b;
  b.layer = 1;
  b.tokens = Tensor::FromVector({6, hidden}, RandomFloats(6 * hidden, 3));
  b.rows = {4, 0, 5, 2};
  b.offsets = {0, 2, 3, 3, 5};
  b.assignments = {{2, 0.7f}, {0, 0.3f}, {6, 1.0f}, {4, 0.5f}, {2, 0.25f}};
  Tensor want;
  {
    auto cpu = LocalExpertGroup::Load(**ckpt, *cfg, keys, backend.get(), "cpu");
    ASSERT_TRUE(cpu.ok()) << cpu.status();
    auto w = (*cpu)->Run(b);
    ASSERT_TRUE(w.ok()) << w.status();
    want = *std::move(w);
  }

  auto group = LocalExpertGroup::Load(**ckpt, *cfg, keys, backend.get(), "dev");
  ASSERT_TRUE(group.ok()) << group.status();
  std::weak_ptr<const void> host_bytes;  // what keeps the weights' bytes (the mapping) alive
  std::unique_ptr<HostDevice> device;
  {
    const std::vector<DeviceExpertWeights> weights = (*group)->DeviceWeights();
    ASSERT_EQ(weights.size(), keys.size());
    host_bytes = weights[0].w1.owner;
    device = std::make_unique<HostDevice>(weights);
  }
  HostDevice* dev = device.get();
  (*group)->AttachDevice(std::move(device));
  EXPECT_FALSE(host_bytes.expired()) << "the checkpoint still holds its mapping";
  ckpt->reset();
  EXPECT_TRUE(host_bytes.expired()) << "the group kept its host weights after AttachDevice";

  auto got = (*group)->Run(b);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(dev->calls, 1);
  ASSERT_EQ(got->shape(), want.shape());
  for (int64_t i = 0; i < 4; ++i) {
    for (int64_t h = 0; h < hidden; ++h) {
      EXPECT_NEAR(got->row(i)[h], want.row(i)[h], 1e-4 + 1e-4 * std::fabs(want.row(i)[h]))
          << "token " << i << " column " << h;
    }
  }
  // An expert the group does not hold is NOT_FOUND before anything reaches the device.
  b.assignments[2].expert = 3;
  auto missing = (*group)->Run(b);
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound) << missing.status();
  EXPECT_EQ(dev->calls, 1);
}

}  // namespace
}  // namespace moemesh
