// Batch invariance of the single-process engine (issue 8, section 5): a request's logits are
// bitwise the same whether it runs alone, in a batch of random others at a random position, or
// in the second of two micro-batches; checked as a property over random batch compositions,
// for F32 and BF16 weights and for one and two expert groups. The mesh side is in
// tests/integration/mesh_test.cc.
#include <cstring>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "services/engine/inproc.h"
#include "tests/test_util.h"

namespace moemesh {
namespace {

using ::moemesh::testing::TempDir;

struct Case {
  DType dtype;
  int groups;
  bool deepseek = false;  // MLA, shared experts, sigmoid group-limited routing
};

class BatchInvarianceTest : public ::testing::TestWithParam<Case> {
 protected:
  // The case's model in `dir`: wide enough that the kernels use full 8-lane chunks, tails and
  // several row tiles.
  static absl::StatusOr<std::unique_ptr<InprocModel>> LoadModel(const TempDir& dir, uint64_t seed) {
    GeneratorOptions o;
    o.config = GetParam().deepseek
                   ? SmallDeepseekConfig(/*vocab=*/128, /*hidden=*/80)
                   : SmallMixtralConfig(/*vocab=*/128, /*hidden=*/72, /*inter=*/100, /*layers=*/2);
    o.seed = seed;
    o.dtype = GetParam().dtype;
    const std::string path = moemesh::testing::MakeModel(dir, "m", o);
    InprocOptions io;
    io.groups = GetParam().groups;
    return InprocModel::Load(path, io);
  }
};

bool Same(const Tensor& a, const Tensor& b) {
  return a.numel() == b.numel() && std::memcmp(a.data(), b.data(), a.numel() * 4) == 0;
}

std::vector<int32_t> RandomTokens(std::mt19937& rng, int n, int vocab) {
  std::vector<int32_t> t(n);
  for (int32_t& x : t) x = static_cast<int32_t>(rng() % vocab);
  return t;
}

TEST_P(BatchInvarianceTest, LogitsAreBitwiseEqualAloneInABatchAndInMicroBatches) {
  TempDir dir;
  auto m = LoadModel(dir, /*seed=*/3);
  ASSERT_TRUE(m.ok()) << m.status();
  Engine& e = *(*m)->engine;
  const int vocab = e.config().vocab_size;
  std::mt19937 rng(11);

  const std::vector<int32_t> probe = RandomTokens(rng, 6, vocab);
  constexpr int kDecode = 4;
  // Alone: prefill, then greedy-free decoding of fixed tokens, logits of every step.
  std::vector<Tensor> alone;
  std::vector<int32_t> next = RandomTokens(rng, kDecode, vocab);
  {
    auto s = e.NewSequence();
    StepInput in{s.get(), probe, false};
    auto r = e.Step({&in, 1});
    ASSERT_TRUE(r.ok()) << r.status();
    alone.push_back((*r)[0]);
    for (int i = 0; i < kDecode; ++i) {
      StepInput d{s.get(), absl::MakeConstSpan(&next[i], 1), false};
      auto dr = e.Step({&d, 1});
      ASSERT_TRUE(dr.ok()) << dr.status();
      alone.push_back((*dr)[0]);
    }
  }

  for (int trial = 0; trial < 6; ++trial) {
    // 16 others with random prompt lengths, some already part-way through their context.
    std::vector<std::unique_ptr<Sequence>> others;
    std::vector<std::vector<int32_t>> other_tokens;
    for (int k = 0; k < 16; ++k) {
      others.push_back(e.NewSequence());
      if (rng() % 2) {
        std::vector<int32_t> pre = RandomTokens(rng, 1 + rng() % 5, vocab);
        StepInput p{others.back().get(), pre, false};
        ASSERT_TRUE(e.Step({&p, 1}).ok());
      }
      other_tokens.push_back(RandomTokens(rng, 1 + rng() % 4, vocab));
    }
    const size_t pos = rng() % 17;
    const bool micro = trial % 2 == 1;  // split the batch in two steps, the probe in the second
    auto s = e.NewSequence();
    for (int step = 0; step <= kDecode; ++step) {
      std::vector<StepInput> batch;
      for (int k = 0; k < 16; ++k) {
        batch.push_back({others[k].get(), other_tokens[k], false});
      }
      const StepInput mine =
          step == 0 ? StepInput{s.get(), probe, false}
                    : StepInput{s.get(), absl::MakeConstSpan(&next[step - 1], 1), false};
      batch.insert(batch.begin() + pos, mine);
      Tensor got;
      if (!micro) {
        auto r = e.Step(batch);
        ASSERT_TRUE(r.ok()) << r.status();
        got = (*r)[pos];
      } else {
        // First micro-batch: the others before the probe's position; second: the rest.
        std::vector<StepInput> first(batch.begin(), batch.begin() + pos);
        std::vector<StepInput> second(batch.begin() + pos, batch.end());
        if (!first.empty()) {
          ASSERT_TRUE(e.Step(first).ok());
        }
        auto r = e.Step(second);
        ASSERT_TRUE(r.ok()) << r.status();
        got = (*r)[0];
      }
      ASSERT_TRUE(Same(got, alone[step])) << "trial " << trial << " step " << step << " position "
                                          << pos << (micro ? " (micro-batches)" : "");
      // The others decode one new token each next step.
      for (int k = 0; k < 16; ++k) other_tokens[k] = RandomTokens(rng, 1, vocab);
    }
  }
}

// Chunk boundaries do not matter either: a prompt prefilled whole, in uneven chunks or token by
// token gives bitwise the same logits, and so does every decode step after it (attention goes
// one query row at a time in the same order; every other kernel is row-invariant).
TEST_P(BatchInvarianceTest, LogitsAreBitwiseEqualWhateverThePromptChunking) {
  TempDir dir;
  auto m = LoadModel(dir, /*seed=*/5);
  ASSERT_TRUE(m.ok()) << m.status();
  Engine& e = *(*m)->engine;
  std::mt19937 rng(23);
  const std::vector<int32_t> prompt = RandomTokens(rng, 37, e.config().vocab_size);
  const std::vector<int32_t> next = RandomTokens(rng, 3, e.config().vocab_size);

  // Logits after the prompt, then after each of `next`.
  auto run = [&](const std::vector<int>& chunks) {
    std::vector<Tensor> out;
    auto seq = e.NewSequence();
    size_t at = 0;
    for (int c : chunks) {
      StepInput in{seq.get(), absl::MakeConstSpan(prompt.data() + at, c), false};
      auto r = e.Step({&in, 1});
      EXPECT_TRUE(r.ok()) << r.status();
      if (!r.ok()) return out;
      at += c;
      if (at == prompt.size()) out.push_back((*r)[0]);
    }
    EXPECT_EQ(at, prompt.size());
    for (const int32_t& t : next) {
      StepInput d{seq.get(), absl::MakeConstSpan(&t, 1), false};
      auto r = e.Step({&d, 1});
      EXPECT_TRUE(r.ok()) << r.status();
      if (!r.ok()) return out;
      out.push_back((*r)[0]);
    }
    return out;
  };
  const std::vector<Tensor> whole = run({37});
  ASSERT_EQ(whole.size(), next.size() + 1);
  const std::vector<std::vector<int>> splits = {
      {16, 16, 5}, {1, 36}, {36, 1}, {7, 3, 11, 16}, std::vector<int>(37, 1)};
  for (const auto& split : splits) {
    const std::vector<Tensor> got = run(split);
    ASSERT_EQ(got.size(), whole.size());
    for (size_t i = 0; i < got.size(); ++i) {
      EXPECT_TRUE(Same(got[i], whole[i]))
          << "chunks of " << split.size() << " (first " << split[0] << "), output " << i;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(All, BatchInvarianceTest,
                         ::testing::Values(Case{DType::kF32, 1}, Case{DType::kF32, 2},
                                           Case{DType::kBF16, 2}, Case{DType::kF8E4M3, 1},
                                           Case{DType::kF32, 2, true},
                                           Case{DType::kF8E4M3, 2, true}),
                         [](const auto& info) {
                           std::string n(DTypeName(info.param.dtype));
                           for (char& c : n) c = c == '_' ? 'x' : c;
                           return (info.param.deepseek ? "DeepSeek_" : "Mixtral_") + n + "_" +
                                  std::to_string(info.param.groups) + "groups";
                         });

}  // namespace
}  // namespace moemesh
