// Tests of the byte-level BPE tokenizer: byte vocabularies round-trip any text, hand-written
// tokenizer.json files merge by rank, and text the vocabulary cannot express is an error.
#include "services/model/tokenizer.h"

#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace moemesh {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

std::string Msg(const absl::Status& s) { return std::string(s.message()); }

Tokenizer ByteTokenizer(int vocab) {
  auto t = Tokenizer::FromJson(Tokenizer::ByteLevelJson(vocab), "byte-level");
  EXPECT_TRUE(t.ok()) << t.status();
  return t.ok() ? *std::move(t) : Tokenizer();
}

TEST(TokenizerTest, ByteLevelIdsAreTheBytes) {
  Tokenizer t = ByteTokenizer(256);
  EXPECT_EQ(t.vocab_size(), 256);
  auto ids = t.Encode("Hi, 7!");
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_THAT(*ids, ElementsAre('H', 'i', ',', ' ', '7', '!'));
  EXPECT_EQ(t.Decode(*ids), "Hi, 7!");
  EXPECT_EQ(t.DecodeOne('\n'), "\n");
}

TEST(TokenizerTest, AsciiAndUtf8RoundTrip) {
  Tokenizer t = ByteTokenizer(256);
  for (const std::string& text :
       {std::string("The quick brown fox\njumps over\tthe lazy dog."), std::string(""),
        std::string("h\xC3\xA9llo w\xC3\xB6rld"),                        // héllo wörld
        std::string("\xE6\x97\xA5\xE6\x9C\xAC\xE8\xAA\x9E"),             // 日本語
        std::string("emoji \xF0\x9F\x99\x82 and \xE2\x80\x94 dash")}) {  // 🙂 —
    auto ids = t.Encode(text);
    ASSERT_TRUE(ids.ok()) << ids.status();
    EXPECT_EQ(ids->size(), text.size()) << "one id per byte without merges";
    EXPECT_EQ(t.Decode(*ids), text);
  }
  // Every byte value, including NUL and invalid UTF-8.
  std::string all;
  for (int b = 0; b < 256; ++b) all.push_back(static_cast<char>(b));
  auto ids = t.Encode(all);
  ASSERT_TRUE(ids.ok()) << ids.status();
  for (int b = 0; b < 256; ++b) EXPECT_EQ((*ids)[b], b);
  EXPECT_EQ(t.Decode(*ids), all);
}

TEST(TokenizerTest, AddedTokensDecodeVerbatim) {
  Tokenizer t = ByteTokenizer(260);
  EXPECT_EQ(t.vocab_size(), 260);
  EXPECT_EQ(t.DecodeOne(256), "<extra_256>");
  EXPECT_EQ(t.Decode({'a', 259, 'b'}), "a<extra_259>b");
}

TEST(TokenizerTest, SmallVocabularyRejectsBytesItLacks) {
  Tokenizer t = ByteTokenizer(96);  // bytes 0..95: digits and capitals, no lower case
  EXPECT_EQ(t.vocab_size(), 96);
  auto ok = t.Encode("AZ 09");
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_THAT(*ok, ElementsAre('A', 'Z', ' ', '0', '9'));
  for (const char* text : {"a", "AZa", "\xC3\xA9", "~"}) {
    auto ids = t.Encode(text);
    ASSERT_FALSE(ids.ok()) << "'" << text << "'";
    EXPECT_EQ(ids.status().code(), absl::StatusCode::kInvalidArgument);
  }
}

TEST(TokenizerTest, GeneratedModelTokenizerLoads) {
  moemesh::testing::TempDir dir;
  const std::string model = moemesh::testing::MakeSmallModel(dir);
  auto t = Tokenizer::Load(model + "/tokenizer.json");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->vocab_size(), 96);
  auto ids = t->Encode("HELLO");
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_EQ(t->Decode(*ids), "HELLO");
}

// A hand-written vocabulary in GPT-2's byte-to-unicode spelling: space is U+0120 'Ġ' and
// newline U+010A 'Ċ'; printable ASCII stands for itself.
constexpr char kMergesJson[] = R"({
  "version": "1.0",
  "added_tokens": [{"id": 20, "content": "<eos>", "special": true}],
  "model": {
    "type": "BPE",
    "vocab": {"a": 0, "b": 1, "c": 2, "\u0120": 3, "\u010a": 4,
              "ab": 5, "bc": 6, "abc": 7, "\u0120a": 8, "aa": 9},
    "merges": ["b c", "a b", "a bc", "\u0120 a", "a a"]
  }
})";

TEST(TokenizerTest, MergesApplyByRank) {
  auto t = Tokenizer::FromJson(kMergesJson, "hand.json");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->vocab_size(), 21);
  // "b c" (rank 0) beats "a b" (rank 1); then "a bc" (rank 2) completes "abc". Applying "a b"
  // first would leave "ab" + "c", for which there is no merge.
  auto ids = t->Encode("abc");
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_THAT(*ids, ElementsAre(7));
  // No "b a" merge: "abab" -> "ab" "ab".
  ids = t->Encode("abab");
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_THAT(*ids, ElementsAre(5, 5));
  // "a b" (rank 1) before "a a" (rank 4): "aab" -> "a" "ab", not "aa" "b".
  ids = t->Encode("aab");
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_THAT(*ids, ElementsAre(0, 5));
  // Space is spelled 'Ġ' and merges with a following "a"; newline is 'Ċ'.
  ids = t->Encode(" a\nc");
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_THAT(*ids, ElementsAre(8, 4, 2));
  EXPECT_EQ(t->Decode({8, 4, 7, 20}), " a\nabc<eos>");
  // 'd' is not in the vocabulary.
  EXPECT_EQ(t->Encode("abd").status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(TokenizerTest, PairFormMerges) {
  // Newer tokenizer.json files list merges as pairs instead of "a b" strings.
  const std::string json = R"({"model": {"type": "BPE",
      "vocab": {"x": 0, "y": 1, "z": 2, "xy": 3, "yz": 4},
      "merges": [["y", "z"], ["x", "y"]]}})";
  auto t = Tokenizer::FromJson(json, "pairs.json");
  ASSERT_TRUE(t.ok()) << t.status();
  auto ids = t->Encode("xyz");
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_THAT(*ids, ElementsAre(0, 4));  // "y z" has rank 0
  ids = t->Encode("xyxy");
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_THAT(*ids, ElementsAre(3, 3));
}

TEST(TokenizerTest, BadFiles) {
  for (const char* json :
       {"{not json", "[]", R"({"model": {}})", R"({"model": {"vocab": {"a": "x"}}})",
        R"({"model": {"vocab": {"a": -1}}})"}) {
    auto t = Tokenizer::FromJson(json, "bad-tokenizer.json");
    ASSERT_FALSE(t.ok()) << json;
    EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument) << json;
    EXPECT_THAT(Msg(t.status()), HasSubstr("bad-tokenizer.json")) << json;
  }
  auto missing = Tokenizer::Load("/nonexistent/dir/tokenizer.json");
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(Msg(missing.status()), HasSubstr("/nonexistent/dir/tokenizer.json"));
}

}  // namespace
}  // namespace moemesh
