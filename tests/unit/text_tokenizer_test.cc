// Unit tests of services/text: each pipeline stage on its own, the BPE model, added-token
// matching, post-processing from tokenizer_config.json, load errors, limits, streaming
// decode, a fuzz-style round trip and concurrent use. The published tokenizers are checked
// against Hugging Face in tests/tokenizer.
#include <atomic>
#include <cstdio>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "services/text/regex.h"
#include "services/text/stages.h"
#include "services/text/tokenizer.h"
#include "services/text/unicode.h"
#include "tests/test_util.h"

namespace moemesh {
namespace {

using json = nlohmann::json;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

std::string Msg(const absl::Status& s) { return std::string(s.message()); }

std::shared_ptr<const Tokenizer> Load(const std::string& tj, const std::string& config = "") {
  auto t = Tokenizer::FromJson(tj, config, "test.json");
  EXPECT_TRUE(t.ok()) << t.status();
  return t.ok() ? *t : nullptr;
}

std::vector<int32_t> Enc(const Tokenizer& t, const std::string& s, bool special = true) {
  auto ids = t.Encode(s, special);
  EXPECT_TRUE(ids.ok()) << ids.status();
  return ids.ok() ? *ids : std::vector<int32_t>{};
}

// ---- normalizers ----------------------------------------------------------------------

std::string Normalize(const json& j, std::string s) {
  auto n = text::MakeNormalizer(j);
  EXPECT_TRUE(n.ok()) << n.status();
  if (!n.ok()) return "";
  EXPECT_TRUE((*n)->Normalize(&s).ok());
  return s;
}

TEST(NormalizerTest, PrependReplaceSequence) {
  const json llama = json::parse(R"({"type": "Sequence", "normalizers": [
      {"type": "Prepend", "prepend": "▁"},
      {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]})");
  EXPECT_EQ(Normalize(llama, "Hello world"), "▁Hello▁world");
  EXPECT_EQ(Normalize(llama, " x"), "▁▁x");
  EXPECT_EQ(Normalize(llama, ""), "");  // Prepend leaves empty text alone
  const json re =
      json::parse(R"({"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": "_"})");
  EXPECT_EQ(Normalize(re, "a \t b\n\nc"), "a_b_c");
}

TEST(NormalizerTest, UnicodeForms) {
  const std::string decomposed = "e\xCC\x81";  // e + COMBINING ACUTE
  EXPECT_EQ(Normalize(json{{"type", "NFC"}}, decomposed), "\xC3\xA9");
  EXPECT_EQ(Normalize(json{{"type", "NFD"}}, "\xC3\xA9"), decomposed);
  EXPECT_EQ(Normalize(json{{"type", "NFKC"}}, "\xEF\xAC\x81"), "fi");  // ﬁ ligature
  EXPECT_EQ(Normalize(json{{"type", "NFC"}}, "\xEF\xAC\x81"), "\xEF\xAC\x81");
  EXPECT_EQ(Normalize(json{{"type", "NFKC"}}, "\xEF\xBC\xA1"), "A");  // fullwidth A
}

TEST(NormalizerTest, UnsupportedTypeNamesIt) {
  auto n = text::MakeNormalizer(json{{"type", "Lowercase"}});
  ASSERT_FALSE(n.ok());
  EXPECT_EQ(n.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Msg(n.status()), HasSubstr("\"Lowercase\""));
}

// ---- pre-tokenizers -------------------------------------------------------------------

std::vector<std::string> PreTok(const json& j, const std::string& s, bool at_start = true) {
  auto p = text::MakePreTokenizer(j);
  EXPECT_TRUE(p.ok()) << p.status();
  if (!p.ok()) return {};
  std::vector<text::Piece> pieces{{s, at_start}};
  EXPECT_TRUE((*p)->PreTokenize(&pieces).ok());
  std::vector<std::string> out;
  for (auto& piece : pieces) out.push_back(piece.text);
  return out;
}

json SplitJson(const std::string& behavior, bool invert = false, const char* pattern = "-") {
  return json{{"type", "Split"},
              {"pattern", {{"String", pattern}}},
              {"behavior", behavior},
              {"invert", invert}};
}

TEST(PreTokenizerTest, SplitBehaviours) {
  EXPECT_THAT(PreTok(SplitJson("Isolated"), "a-b--c"), ElementsAre("a", "-", "b", "-", "-", "c"));
  EXPECT_THAT(PreTok(SplitJson("Removed"), "a-b--c"), ElementsAre("a", "b", "c"));
  EXPECT_THAT(PreTok(SplitJson("MergedWithPrevious"), "a-b--c"), ElementsAre("a-", "b-", "-", "c"));
  EXPECT_THAT(PreTok(SplitJson("MergedWithNext"), "a-b--c"), ElementsAre("a", "-b", "-", "-c"));
  EXPECT_THAT(PreTok(SplitJson("Contiguous"), "a-b--c"), ElementsAre("a", "-", "b", "--", "c"));
  // invert: the pattern describes the pieces to keep apart, the rest is the delimiter.
  EXPECT_THAT(PreTok(SplitJson("Removed", true), "a-b--c"), ElementsAre("-", "-", "-"));
}

TEST(PreTokenizerTest, SplitRegexWithLookaheadAndUnicodeClasses) {
  const json j = {
      {"type", "Split"},
      {"pattern", {{"Regex", R"((?i:'s|'t)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|\s+(?!\S)|\s+)"}}},
      {"behavior", "Isolated"},
      {"invert", false}};
  EXPECT_THAT(PreTok(j, "IT'S 12345 héllo   world"),
              ElementsAre("IT", "'S", " ", "123", "45", " héllo", "  ", " world"));
}

TEST(PreTokenizerTest, ByteLevel) {
  const json with_prefix = {{"type", "ByteLevel"}, {"add_prefix_space", true}};
  EXPECT_THAT(PreTok(with_prefix, "hello world"), ElementsAre("\xC4\xA0hello", "\xC4\xA0world"));
  const json plain = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}};
  // No split; space is U+0120, newline U+010A, é's two bytes Ã ©.
  EXPECT_THAT(PreTok(plain, "a b\n\xC3\xA9"), ElementsAre("a\xC4\xA0"
                                                          "b\xC4\x8A\xC3\x83\xC2\xA9"));
}

TEST(PreTokenizerTest, MetaspacePrependSchemes) {
  auto ms = [](const char* scheme) {
    return json{
        {"type", "Metaspace"}, {"replacement", "▁"}, {"prepend_scheme", scheme}, {"split", true}};
  };
  EXPECT_THAT(PreTok(ms("always"), "Hey friend"), ElementsAre("▁Hey", "▁friend"));
  EXPECT_THAT(PreTok(ms("always"), "x y", false), ElementsAre("▁x", "▁y"));
  EXPECT_THAT(PreTok(ms("first"), "x y", true), ElementsAre("▁x", "▁y"));
  EXPECT_THAT(PreTok(ms("first"), "x y", false), ElementsAre("x", "▁y"));
  EXPECT_THAT(PreTok(ms("never"), "x  y"), ElementsAre("x", "▁", "▁y"));
  json nosplit = ms("always");
  nosplit["split"] = false;
  EXPECT_THAT(PreTok(nosplit, "a b"), ElementsAre("▁a▁b"));
}

TEST(PreTokenizerTest, Digits) {
  EXPECT_THAT(PreTok(json{{"type", "Digits"}, {"individual_digits", true}}, "ab12c٣"),
              ElementsAre("ab", "1", "2", "c", "٣"));
  EXPECT_THAT(PreTok(json{{"type", "Digits"}, {"individual_digits", false}}, "ab12c3"),
              ElementsAre("ab", "12", "c", "3"));
}

TEST(PreTokenizerTest, UnsupportedTypeAndBadRegex) {
  auto p = text::MakePreTokenizer(json{{"type", "BertPreTokenizer"}});
  ASSERT_FALSE(p.ok());
  EXPECT_THAT(Msg(p.status()), HasSubstr("\"BertPreTokenizer\""));
  p = text::MakePreTokenizer(SplitJson("Isolated"));
  EXPECT_TRUE(p.ok());
  json bad = SplitJson("Isolated");
  bad["pattern"] = {{"Regex", "(unclosed"}};
  p = text::MakePreTokenizer(bad);
  ASSERT_FALSE(p.ok());
  EXPECT_THAT(Msg(p.status()), HasSubstr("(unclosed"));
  p = text::MakePreTokenizer(SplitJson("Sideways"));
  ASSERT_FALSE(p.ok());
  EXPECT_THAT(Msg(p.status()), HasSubstr("Sideways"));
}

// ---- decoders -------------------------------------------------------------------------

std::string DecodeWith(const json& j, std::vector<std::string> tokens) {
  auto d = text::MakeDecoder(j);
  EXPECT_TRUE(d.ok()) << d.status();
  if (!d.ok()) return "";
  (*d)->DecodeChain(&tokens);
  std::string out;
  for (auto& t : tokens) out += t;
  return out;
}

TEST(DecoderTest, LlamaChain) {
  const json j = json::parse(R"({"type": "Sequence", "decoders": [
      {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
      {"type": "ByteFallback"}, {"type": "Fuse"},
      {"type": "Strip", "content": " ", "start": 1, "stop": 0}]})");
  EXPECT_EQ(DecodeWith(j, {"▁Hello", "▁world", "<0xE4>", "<0xB8>", "<0xAD>", "!"}),
            "Hello world中!");
  // Bytes that are not UTF-8: one U+FFFD each, as Hugging Face's ByteFallback.
  EXPECT_EQ(DecodeWith(j, {"a", "<0xE4>", "<0xB8>", "b"}),
            "a\xEF\xBF\xBD\xEF\xBF\xBD"
            "b");
}

TEST(DecoderTest, ByteLevelAndMetaspace) {
  EXPECT_EQ(DecodeWith(json{{"type", "ByteLevel"}}, {"\xC4\xA0hi", "\xC4\x8A", "<｜User｜>"}),
            " hi\n<｜User｜>");
  // A truncated character at the end becomes one U+FFFD.
  EXPECT_EQ(DecodeWith(json{{"type", "ByteLevel"}}, {"a\xC3\xA4\xC2\xB8"}), "a\xEF\xBF\xBD");
  const json ms = {{"type", "Metaspace"}, {"replacement", "▁"}, {"prepend_scheme", "always"}};
  EXPECT_EQ(DecodeWith(ms, {"▁Hey", "▁friend", "!"}), "Hey friend!");
  const json never = {{"type", "Metaspace"}, {"replacement", "▁"}, {"prepend_scheme", "never"}};
  EXPECT_EQ(DecodeWith(never, {"▁Hey", "▁friend"}), " Hey friend");
}

TEST(DecoderTest, UnsupportedTypeNamesIt) {
  auto d = text::MakeDecoder(json{{"type", "WordPiece"}});
  ASSERT_FALSE(d.ok());
  EXPECT_THAT(Msg(d.status()), HasSubstr("\"WordPiece\""));
}

// ---- BPE and the whole tokenizer ------------------------------------------------------

// A hand-written vocabulary in GPT-2's byte-to-unicode spelling: space is U+0120 'Ġ' and
// newline U+010A 'Ċ'; printable ASCII stands for itself.
constexpr char kMergesJson[] = R"({
  "version": "1.0",
  "added_tokens": [{"id": 20, "content": "<eos>", "special": true, "normalized": false}],
  "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "use_regex": false},
  "decoder": {"type": "ByteLevel"},
  "model": {
    "type": "BPE",
    "vocab": {"a": 0, "b": 1, "c": 2, "\u0120": 3, "\u010a": 4,
              "ab": 5, "bc": 6, "abc": 7, "\u0120a": 8, "aa": 9},
    "merges": ["b c", "a b", "a bc", "\u0120 a", "a a"]
  }
})";

TEST(BpeTest, MergesApplyByRank) {
  auto t = Load(kMergesJson);
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->vocab_size(), 21);
  // "b c" (rank 0) beats "a b" (rank 1); then "a bc" (rank 2) completes "abc".
  EXPECT_THAT(Enc(*t, "abc"), ElementsAre(7));
  EXPECT_THAT(Enc(*t, "abab"), ElementsAre(5, 5));
  // "a b" (rank 1) before "a a" (rank 4): "aab" -> "a" "ab".
  EXPECT_THAT(Enc(*t, "aab"), ElementsAre(0, 5));
  // Equal ranks merge leftmost first: "aaa" -> "aa" "a".
  EXPECT_THAT(Enc(*t, "aaa"), ElementsAre(9, 0));
  EXPECT_THAT(Enc(*t, " a\nc"), ElementsAre(8, 4, 2));
  EXPECT_EQ(t->Decode({8, 4, 7, 20}), " a\nabc<eos>");
  EXPECT_EQ(t->Decode({8, 20, 7}, /*skip_special_tokens=*/true), " aabc");
  // 'd' is in no vocabulary entry and there is no unk_token: dropped, as Hugging Face does.
  EXPECT_THAT(Enc(*t, "abd"), ElementsAre(5));
}

TEST(BpeTest, PairFormMergesAndIgnoreMerges) {
  const std::string pairs = R"({"model": {"type": "BPE",
      "vocab": {"x": 0, "y": 1, "z": 2, "xy": 3, "yz": 4, "xyz": 5},
      "merges": [["y", "z"], ["x", "y"]]}})";
  auto t = Load(pairs);
  ASSERT_NE(t, nullptr);
  EXPECT_THAT(Enc(*t, "xyz"), ElementsAre(0, 4));  // merges cannot reach "xyz"
  EXPECT_THAT(Enc(*t, "xyxy"), ElementsAre(3, 3));
  json j = json::parse(pairs);
  j["model"]["ignore_merges"] = true;
  auto ig = Load(j.dump());
  EXPECT_THAT(Enc(*ig, "xyz"), ElementsAre(5));  // a whole word in the vocab is one token
}

// A sentencepiece-style BPE like Mistral's: byte fallback, <unk>, a Prepend/Replace
// normalizer and the Replace/ByteFallback/Fuse/Strip decoder.
json LlamaLikeJson() {
  json j = json::parse(R"({
    "added_tokens": [
      {"id": 0, "content": "<unk>", "special": true, "normalized": false},
      {"id": 1, "content": "<s>", "special": true, "normalized": false},
      {"id": 2, "content": "</s>", "special": true, "normalized": false}],
    "normalizer": {"type": "Sequence", "normalizers": [
      {"type": "Prepend", "prepend": "▁"},
      {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
    "pre_tokenizer": null,
    "post_processor": {"type": "TemplateProcessing",
      "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
      "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
    "decoder": {"type": "Sequence", "decoders": [
      {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
      {"type": "ByteFallback"}, {"type": "Fuse"},
      {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
    "model": {"type": "BPE", "unk_token": "<unk>", "fuse_unk": true, "byte_fallback": true,
              "merges": ["▁ a"]}})");
  json vocab = {{"<unk>", 0}, {"<s>", 1}, {"</s>", 2}, {"▁", 3}, {"a", 4}, {"b", 5}, {"▁a", 6}};
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof(name), "<0x%02X>", b);
    vocab[name] = 7 + b;
  }
  j["model"]["vocab"] = vocab;
  return j;
}

TEST(BpeTest, ByteFallbackUnkAndTemplate) {
  auto t = Load(LlamaLikeJson().dump());
  ASSERT_NE(t, nullptr);
  // "▁a" merges; 'é' is not in the vocab: its bytes C3 A9 are <0xC3> <0xA9>.
  EXPECT_THAT(Enc(*t, "a b\xC3\xA9"), ElementsAre(1, 6, 3, 5, 7 + 0xC3, 7 + 0xA9));
  EXPECT_THAT(Enc(*t, "a", false), ElementsAre(6));
  // Strip runs after Fuse, on the whole text: behind "<s>" the space stays (as in HF).
  EXPECT_EQ(t->Decode(Enc(*t, "a b\xC3\xA9")), "<s> a b\xC3\xA9");
  EXPECT_EQ(t->Decode(Enc(*t, "a b\xC3\xA9"), true), "a b\xC3\xA9");
  // Without byte fallback, unknown characters become <unk>, consecutive ones fused.
  json j = LlamaLikeJson();
  j["model"]["byte_fallback"] = false;
  auto u = Load(j.dump());
  EXPECT_THAT(Enc(*u,
                  "a\xC3\xA9\xC3\xA9"
                  "b",
                  false),
              ElementsAre(6, 0, 5));
  j["model"]["fuse_unk"] = false;
  auto nf = Load(j.dump());
  EXPECT_THAT(Enc(*nf,
                  "a\xC3\xA9\xC3\xA9"
                  "b",
                  false),
              ElementsAre(6, 0, 0, 5));
}

TEST(TokenizerTest, ConfigRebuildsLlamaPostProcessor) {
  const std::string tj = LlamaLikeJson().dump();
  // LlamaTokenizerFast rebuilds the post-processor from add_bos_token / add_eos_token.
  auto both = Load(tj, R"({"tokenizer_class": "LlamaTokenizer", "add_bos_token": true,
      "add_eos_token": true, "bos_token": "<s>", "eos_token": {"content": "</s>"}})");
  EXPECT_THAT(Enc(*both, "a"), ElementsAre(1, 6, 2));
  EXPECT_EQ(both->bos_token(), "<s>");
  EXPECT_EQ(both->eos_token(), "</s>");
  auto none = Load(tj, R"({"tokenizer_class": "LlamaTokenizerFast", "add_bos_token": false,
      "bos_token": "<s>"})");
  EXPECT_THAT(Enc(*none, "a"), ElementsAre(6));
  // Other classes keep tokenizer.json's post-processor.
  auto qwen = Load(tj, R"({"tokenizer_class": "Qwen2Tokenizer", "add_bos_token": false})");
  EXPECT_THAT(Enc(*qwen, "a"), ElementsAre(1, 6));
  auto bad = Tokenizer::FromJson(tj, R"({"tokenizer_class": "LlamaTokenizer", "bos_token": "<x>"})",
                                 "cfg");
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(Msg(bad.status()), HasSubstr("bos_token"));
}

TEST(TokenizerTest, ChatTemplateFromConfig) {
  const std::string tj = LlamaLikeJson().dump();
  EXPECT_EQ(Load(tj, R"({"chat_template": "{{ x }}"})")->chat_template(), "{{ x }}");
  EXPECT_EQ(Load(tj, R"({"chat_template": [{"name": "tool_use", "template": "T"},
      {"name": "default", "template": "D"}]})")
                ->chat_template(),
            "D");
  EXPECT_EQ(Load(tj)->chat_template(), "");
}

// Added tokens: special and not, normalized or matched on the raw text, and the
// lstrip / rstrip / single_word flags.
std::shared_ptr<const Tokenizer> AddedTokenizer(const std::string& flags) {
  json j = json::parse(Tokenizer::ByteLevelJson(256));
  j["added_tokens"] = json::array();
  json t = json::parse(flags);
  t["id"] = 300;
  t["content"] = "<m>";
  j["added_tokens"].push_back(t);
  return Load(j.dump());
}

TEST(AddedTokensTest, StripAndSingleWord) {
  auto plain = AddedTokenizer(R"({"special": true})");
  EXPECT_THAT(Enc(*plain, "a <m> b"), ElementsAre('a', ' ', 300, ' ', 'b'));
  auto l = AddedTokenizer(R"({"special": true, "lstrip": true})");
  EXPECT_THAT(Enc(*l, "a  <m> b"), ElementsAre('a', 300, ' ', 'b'));
  auto r = AddedTokenizer(R"({"special": true, "rstrip": true})");
  EXPECT_THAT(Enc(*r, "a <m> \n b"), ElementsAre('a', ' ', 300, 'b'));
  auto w = AddedTokenizer(R"({"special": true, "single_word": true})");
  EXPECT_THAT(Enc(*w, "x<m> <m>"), ElementsAre('x', '<', 'm', '>', ' ', 300));
  EXPECT_EQ(w->Decode({'x', 300}, true), "x");
  EXPECT_TRUE(w->IsSpecial(300));
  EXPECT_FALSE(w->IsSpecial('x'));
  EXPECT_EQ(w->TokenToId("<m>"), 300);
  EXPECT_EQ(w->IdToToken(300), "<m>");
  EXPECT_EQ(w->vocab_size(), 301);
}

TEST(AddedTokensTest, NormalizedTokensMatchAfterNormalization) {
  json j = json::parse(Tokenizer::ByteLevelJson(256));
  j["normalizer"] = {{"type", "NFKC"}};
  // "ﬁx" normalizes to "fix": a normalized token matches it, a raw one does not.
  j["added_tokens"] = {{{"id", 300}, {"content", "fix"}, {"special", false}, {"normalized", true}},
                       {{"id", 301}, {"content", "ok"}, {"special", false}, {"normalized", false}}};
  auto t = Load(j.dump());
  EXPECT_THAT(Enc(*t, "\xEF\xAC\x81x ok"), ElementsAre(300, ' ', 301));
  EXPECT_FALSE(t->IsSpecial(300));
  EXPECT_EQ(t->Decode({300, 301}, /*skip_special_tokens=*/true), "fixok");
}

TEST(TokenizerTest, LimitsAndBadInput) {
  auto t = Tokenizer::FromJson(Tokenizer::ByteLevelJson(256), "", "byte", TokenizerOptions{16});
  ASSERT_TRUE(t.ok());
  EXPECT_TRUE((*t)->Encode(std::string(16, 'a')).ok());
  auto big = (*t)->Encode(std::string(17, 'a'));
  EXPECT_EQ(big.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Msg(big.status()), HasSubstr("limit"));
  auto bad = (*t)->Encode("ok \xC3(");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*t)->Decode({-5, 1000000, 'a'}), "a");  // unknown ids are dropped
}

TEST(TokenizerTest, BadFiles) {
  for (const char* tj :
       {"{not json", "[]", R"({"model": {}})", R"({"model": {"vocab": {"a": "x"}}})",
        R"({"model": {"vocab": {"a": -1}}})", R"({"model": {"type": "Unigram", "vocab": []}})",
        R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a b"]}})"}) {
    auto t = Tokenizer::FromJson(tj, "", "bad-tokenizer.json");
    ASSERT_FALSE(t.ok()) << tj;
    EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument) << tj;
    EXPECT_THAT(Msg(t.status()), HasSubstr("bad-tokenizer.json")) << tj;
  }
  auto unigram = Tokenizer::FromJson(R"({"model": {"type": "Unigram", "vocab": []}})", "", "u");
  EXPECT_THAT(Msg(unigram.status()), HasSubstr("\"Unigram\""));
  auto missing = Tokenizer::LoadDir("/nonexistent/dir");
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(Msg(missing.status()), HasSubstr("/nonexistent/dir/tokenizer.json"));
}

TEST(TokenizerTest, GeneratedModelTokenizerLoads) {
  moemesh::testing::TempDir dir;
  const std::string model = moemesh::testing::MakeSmallModel(dir);
  auto t = Tokenizer::LoadDir(model);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ((*t)->vocab_size(), 96);
  EXPECT_EQ((*t)->Decode(Enc(**t, "HELLO")), "HELLO");
}

// ---- byte-level round trip, streaming, threads ----------------------------------------

// Random valid UTF-8: random bytes with ill-formed sequences repaired as U+FFFD, plus
// characters from many scripts.
std::string RandomText(std::mt19937& rng, size_t n) {
  std::string bytes;
  std::uniform_int_distribution<int> byte(0, 255), kind(0, 3);
  const char32_t starts[] = {0x20, 0x400, 0x4E00, 0x1F600, 0x600, 0x300};
  std::uniform_int_distribution<int> block(0, 5), off(0, 200);
  for (size_t i = 0; i < n; ++i) {
    if (kind(rng) == 0) {
      bytes.push_back(static_cast<char>(byte(rng)));
    } else {
      text::AppendUtf8(starts[block(rng)] + off(rng), &bytes);
    }
  }
  return text::Utf8Lossy(bytes);
}

TEST(RoundTripTest, ByteLevelAnyText) {
  auto t = Load(Tokenizer::ByteLevelJson(256));
  std::mt19937 rng(7);
  for (int i = 0; i < 300; ++i) {
    const std::string s = RandomText(rng, 1 + i % 64);
    ASSERT_EQ(t->Decode(Enc(*t, s, false)), s);
  }
}

TEST(RoundTripTest, ByteFallbackAnyText) {
  auto t = Load(LlamaLikeJson().dump());
  std::mt19937 rng(8);
  for (int i = 0; i < 300; ++i) {
    // The llama-style decoder strips the one leading space the normalizer added.
    const std::string s = "x" + RandomText(rng, 1 + i % 64);
    ASSERT_EQ(t->Decode(Enc(*t, s), true), s);
  }
}

TEST(DecodeStreamTest, MultiByteAndByteFallbackPieces) {
  auto t = Load(LlamaLikeJson().dump());
  // 中 as three byte-fallback tokens: nothing until the character is complete.
  DecodeStream s(t);
  EXPECT_EQ(s.Push(6), "a");
  EXPECT_EQ(s.Push(7 + 0xE4), "");
  EXPECT_EQ(s.Push(7 + 0xB8), "");
  EXPECT_EQ(s.Push(7 + 0xAD), "\xE4\xB8\xAD");
  EXPECT_EQ(s.Push(3), " ");
  EXPECT_EQ(s.Flush(), "");
  // A character that never completes comes out of Flush, as Decode renders it.
  DecodeStream cut(t);
  EXPECT_EQ(cut.Push(7 + 0xE4), "");
  EXPECT_EQ(cut.Flush(), t->Decode({7 + 0xE4}));
  // Byte-level: every prefix of every stream is valid UTF-8 and the pieces add up.
  auto b = Load(Tokenizer::ByteLevelJson(256));
  std::mt19937 rng(9);
  for (int i = 0; i < 100; ++i) {
    const std::vector<int32_t> ids = Enc(*b, RandomText(rng, 20), false);
    DecodeStream ds(b);
    std::string all;
    for (int32_t id : ids) {
      const std::string piece = ds.Push(id);
      ASSERT_TRUE(text::IsValidUtf8(piece));
      all += piece;
    }
    all += ds.Flush();
    ASSERT_EQ(all, b->Decode(ids));
  }
}

TEST(Utf8StreamTest, HoldsIncompleteCharacters) {
  Utf8Stream s;
  EXPECT_EQ(s.Push("a\xE4"), "a");
  EXPECT_EQ(s.Push("\xB8"), "");
  EXPECT_EQ(s.Push("\xAD"
                   "b"),
            "\xE4\xB8\xAD"
            "b");
  EXPECT_EQ(s.Push("\xFF"), "\xEF\xBF\xBD");
  EXPECT_EQ(s.Push("\xF0\x9F"), "");
  EXPECT_EQ(s.Flush(), "\xEF\xBF\xBD");
}

TEST(TokenizerTest, ConcurrentEncodeIsDeterministic) {
  json j = json::parse(kMergesJson);
  j["pre_tokenizer"] = {{"type", "ByteLevel"}, {"add_prefix_space", false}};
  auto t = Load(j.dump());
  std::string text;
  for (int i = 0; i < 2000; ++i) text += (i % 3 ? "abc " : "aab\nbc ");
  const std::vector<int32_t> want = Enc(*t, text);
  std::vector<std::thread> threads;
  std::atomic<int> mismatches{0};
  for (int k = 0; k < 4; ++k) {
    threads.emplace_back([&] {
      for (int r = 0; r < 20; ++r) {
        auto ids = t->Encode(text);
        if (!ids.ok() || *ids != want) ++mismatches;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(mismatches.load(), 0);
}

TEST(RegexTest, FindAllLikeOnigFindIter) {
  auto r = text::Regex::Compile("a*");
  ASSERT_TRUE(r.ok());
  std::vector<text::Regex::Span> m;
  ASSERT_TRUE((*r)->FindAll("baab", &m).ok());
  // Empty match at 0, "aa" at 1..3, no empty match right after it, empty match at the end.
  EXPECT_THAT(m, ElementsAre(std::pair<size_t, size_t>(0, 0), std::pair<size_t, size_t>(1, 3),
                             std::pair<size_t, size_t>(4, 4)));
}

}  // namespace
}  // namespace moemesh

namespace moemesh {
namespace {

// A value of the wrong JSON type (found by fuzz_tokenizer: an object where a string belongs) is a
// load error naming the file, never an uncaught exception.
TEST(TokenizerLoadTest, WrongJsonTypesAreLoadErrors) {
  const std::string good = Tokenizer::ByteLevelJson(256);
  ASSERT_TRUE(Tokenizer::FromJson(good, "", "ok.json").ok());
  for (const auto& [path, value] : std::vector<std::pair<std::string, nlohmann::json>>{
           {"/model/type", nlohmann::json::object()},
           {"/model/vocab", "not a map"},
           {"/decoder", nlohmann::json::array({1, 2})}}) {
    nlohmann::json j = nlohmann::json::parse(good);
    j[nlohmann::json::json_pointer(path)] = value;
    auto t = Tokenizer::FromJson(j.dump(), "", "bad.json");
    ASSERT_FALSE(t.ok()) << path;
    EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument) << t.status();
    EXPECT_NE(std::string(t.status().message()).find("bad.json"), std::string::npos) << t.status();
  }
  // tokenizer_config.json too.
  auto t = Tokenizer::FromJson(good, R"({"bos_token": [1, 2], "chat_template": 5})", "cfg.json");
  if (!t.ok()) {
    EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument) << t.status();
  }
}

}  // namespace
}  // namespace moemesh
