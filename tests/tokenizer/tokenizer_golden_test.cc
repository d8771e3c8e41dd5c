// moemesh's tokenizer against Hugging Face's, on the published tokenizer files of
// DeepSeek-V3, Llama-2 (Mistral/Mixtral's vocabulary family), Llama-3, Llama-3.1 and Qwen3.
//
// The goldens come from transformers.js (tests/tokenizer/make_goldens.cjs, run by the CTest
// fixture `tokenizer_goldens` into the build tree): for every corpus text, the ids with and
// without special tokens and the decoded text with and without skip_special_tokens. The
// test also streams every golden id list through DecodeStream and checks the pieces add up
// to Decode. Missing goldens are a failure, never a skip.
#include <cstdlib>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "services/text/tokenizer.h"
#include "services/text/unicode.h"

#ifndef MOEMESH_TOKENIZER_GOLDEN_DIR
#error "MOEMESH_TOKENIZER_GOLDEN_DIR must name the goldens written by make_goldens.sh"
#endif

namespace moemesh {
namespace {

using json = nlohmann::json;

// MOEMESH_TOKENIZER_GOLDEN_DIR in the environment points the test at other goldens (to
// investigate a text outside the corpus).
std::string GoldenDir() {
  const char* env = std::getenv("MOEMESH_TOKENIZER_GOLDEN_DIR");
  return env != nullptr && *env != '\0' ? env : MOEMESH_TOKENIZER_GOLDEN_DIR;
}

bool ReadJson(const std::string& path, json* out) {
  std::ifstream in(path);
  if (!in) return false;
  std::stringstream ss;
  ss << in.rdbuf();
  *out = json::parse(ss.str());
  return true;
}

std::string Excerpt(const std::string& s) {
  std::string e = s.size() > 120 ? s.substr(0, 120) + "…" : s;
  return json(e).dump();
}

std::string Ids(const std::vector<int32_t>& ids) {
  std::string s = "[";
  for (size_t i = 0; i < ids.size() && i < 40; ++i) s += (i ? "," : "") + std::to_string(ids[i]);
  return s + (ids.size() > 40 ? ",…]" : "]");
}

class GoldenTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    ASSERT_TRUE(ReadJson(GoldenDir() + "/corpus.json", &corpus_))
        << "no goldens in " << GoldenDir()
        << ": the CTest fixture tokenizer_goldens (npm install + make_goldens.cjs) must run first";
    ASSERT_TRUE(ReadJson(GoldenDir() + "/" + GetParam() + "/golden.json", &golden_));
    auto t = Tokenizer::LoadDir(GoldenDir() + "/" + GetParam());
    ASSERT_TRUE(t.ok()) << t.status();
    tok_ = *std::move(t);
    ASSERT_EQ(golden_["cases"].size(), corpus_.size());
  }
  json corpus_, golden_;
  std::shared_ptr<const Tokenizer> tok_;
};

constexpr int kMaxReports = 8;

TEST_P(GoldenTest, IdsMatch) {
  int bad = 0;
  for (size_t i = 0; i < corpus_.size(); ++i) {
    const std::string text = corpus_[i].get<std::string>();
    const json& c = golden_["cases"][i];
    for (bool special : {false, true}) {
      const auto want = c[special ? "ids_special" : "ids"].get<std::vector<int32_t>>();
      auto got = tok_->Encode(text, special);
      ASSERT_TRUE(got.ok()) << got.status();
      if (*got != want && ++bad <= kMaxReports) {
        ADD_FAILURE() << GetParam() << " case " << i << " add_special_tokens=" << special
                      << " text " << Excerpt(text) << "\n  want " << Ids(want) << "\n  got  "
                      << Ids(*got);
      }
    }
  }
  EXPECT_EQ(bad, 0) << "of " << 2 * corpus_.size() << " encodings";
}

TEST_P(GoldenTest, DecodeMatches) {
  int bad = 0;
  for (size_t i = 0; i < corpus_.size(); ++i) {
    const json& c = golden_["cases"][i];
    const auto ids = c["ids_special"].get<std::vector<int32_t>>();
    for (bool skip : {false, true}) {
      const std::string want = c[skip ? "decoded_skip" : "decoded"].get<std::string>();
      const std::string got = tok_->Decode(ids, skip);
      if (got != want && ++bad <= kMaxReports) {
        ADD_FAILURE() << GetParam() << " case " << i << " skip_special_tokens=" << skip
                      << "\n  want " << Excerpt(want) << "\n  got  " << Excerpt(got);
      }
    }
  }
  EXPECT_EQ(bad, 0) << "of " << 2 * corpus_.size() << " decodings";
}

TEST_P(GoldenTest, StreamingDecodeAddsUpToDecode) {
  int bad = 0;
  for (size_t i = 0; i < corpus_.size(); ++i) {
    const auto ids = golden_["cases"][i]["ids_special"].get<std::vector<int32_t>>();
    for (bool skip : {false, true}) {
      DecodeStream stream(tok_, skip);
      std::string all;
      for (int32_t id : ids) all += stream.Push(id);
      all += stream.Flush();
      const std::string want = tok_->Decode(ids, skip);
      if (all != want && ++bad <= kMaxReports) {
        ADD_FAILURE() << GetParam() << " case " << i << " skip=" << skip << "\n  want "
                      << Excerpt(want) << "\n  got  " << Excerpt(all);
      }
    }
  }
  EXPECT_EQ(bad, 0);
}

// Fuzz-style round trip on the real vocabularies: random bytes, repaired to valid UTF-8,
// encode and decode back to themselves (after NFC where the tokenizer normalizes with it):
// byte-level BPE and byte fallback lose nothing.
TEST_P(GoldenTest, RandomTextRoundTrips) {
  std::mt19937 rng(42);
  std::uniform_int_distribution<int> byte(0, 255), len(1, 200), kind(0, 2);
  int bad = 0;
  for (int i = 0; i < 500; ++i) {
    std::string bytes;
    const int n = len(rng);
    for (int k = 0; k < n; ++k) {
      // Mostly ASCII and UTF-8 lead/continuation bytes so that real characters form too.
      const int b = byte(rng);
      bytes.push_back(static_cast<char>(kind(rng) == 0   ? b
                                        : kind(rng) == 1 ? (b & 0x7F)
                                                         : (0x80 | (b & 0x3F))));
      if (b % 7 == 0) text::AppendUtf8(0x4E00 + b * 37, &bytes);
    }
    const std::string text = text::Utf8Lossy(bytes);
    auto ids = tok_->Encode(text, false);
    ASSERT_TRUE(ids.ok()) << ids.status();
    std::string want = text;
    if (GetParam() == "qwen3") want = *text::Normalize(text, text::NormalForm::kNfc);
    if (tok_->Decode(*ids) != want && ++bad <= kMaxReports) {
      ADD_FAILURE() << GetParam() << " " << json(text).dump();
    }
  }
  EXPECT_EQ(bad, 0);
}

// 1 MiB runs of what makes backtracking regexes or BPE work hardest still encode (a
// quadratic path would time the test out) and still round-trip; over the limit is refused.
TEST_P(GoldenTest, LongRunsEncode) {
  const size_t n = size_t{1} << 20;
  for (const std::string& unit :
       {std::string(" "), std::string("\n"), std::string(" \n"), std::string("a"), std::string("7"),
        std::string("!"), std::string("\xE4\xB8\xAD"), std::string("  x")}) {
    std::string text;
    while (text.size() + unit.size() <= n) text += unit;
    auto ids = tok_->Encode(text, false);
    ASSERT_TRUE(ids.ok()) << ids.status();
    EXPECT_TRUE(tok_->Decode(*ids) == text) << json(unit).dump();
  }
  auto over = tok_->Encode(std::string(tok_->options().max_input_bytes + 1, 'a'));
  EXPECT_EQ(over.status().code(), absl::StatusCode::kInvalidArgument);
}

INSTANTIATE_TEST_SUITE_P(Published, GoldenTest,
                         ::testing::Values("deepseek_v3", "llama2", "llama3", "llama3_1", "qwen3"),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace moemesh
