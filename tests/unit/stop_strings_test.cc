// StopStrings and GenerationConfig: the text-side rules of generation.
#include "services/text/stop_strings.h"

#include <filesystem>
#include <fstream>
#include <random>

#include "gtest/gtest.h"
#include "services/text/generation_config.h"

namespace moemesh {
namespace {

// What the streamed text must add up to: the text cut before the earliest stop string.
std::string CutAtFirst(const std::string& text, const std::vector<std::string>& stops) {
  size_t cut = std::string::npos;
  for (const std::string& s : stops)
    if (!s.empty()) cut = std::min(cut, text.find(s));
  return cut == std::string::npos ? text : text.substr(0, cut);
}

TEST(StopStringsTest, FindsAStopStringAcrossPieces) {
  StopStrings s({"</end>"});
  EXPECT_EQ(s.Push("hello </"), "hello ");  // "</" may start the stop string: held back
  EXPECT_FALSE(s.stopped());
  EXPECT_EQ(s.Push("en"), "");
  EXPECT_EQ(s.Push("d> more"), "");
  EXPECT_TRUE(s.stopped());
  EXPECT_EQ(s.matched(), "</end>");
  EXPECT_EQ(s.Push("after"), "");
  EXPECT_EQ(s.Flush(), "");
}

TEST(StopStringsTest, ReleasesHeldTextWhenItCannotMatch) {
  StopStrings s({"STOP"});
  EXPECT_EQ(s.Push("a ST"), "a ");
  EXPECT_EQ(s.Push("OX"), "STOX");
  EXPECT_EQ(s.Push("S"), "");
  EXPECT_EQ(s.Flush(), "S");
  EXPECT_FALSE(s.stopped());
}

TEST(StopStringsTest, EarliestOfSeveralWins) {
  StopStrings s({"world", "lo w"});
  EXPECT_EQ(s.Push("hello world"), "hel");
  EXPECT_EQ(s.matched(), "lo w");
}

TEST(StopStringsTest, MultiByteStopStrings) {
  StopStrings s({"。\n"});
  EXPECT_EQ(s.Push("你好"), "你好");
  EXPECT_EQ(s.Push("。"), "");
  EXPECT_EQ(s.Push("\n再见"), "");
  EXPECT_TRUE(s.stopped());
}

TEST(StopStringsTest, NoStopsPassesEverythingThrough) {
  StopStrings s({"", ""});
  EXPECT_TRUE(s.empty());
  EXPECT_EQ(s.Push("abc"), "abc");
  EXPECT_EQ(s.Flush(), "");
}

// Property: for random texts, stop sets and piece boundaries, the concatenated output equals
// the text cut before the first stop string, and no output ever ends in text that the full
// answer does not contain.
TEST(StopStringsTest, RandomPiecesMatchTheWholeTextRule) {
  std::mt19937 rng(7);
  const std::string alphabet = "ab c\n";
  for (int iter = 0; iter < 3000; ++iter) {
    std::string text;
    const int len = rng() % 40;
    for (int i = 0; i < len; ++i) text += alphabet[rng() % alphabet.size()];
    std::vector<std::string> stops(1 + rng() % 3);
    for (std::string& st : stops) {
      const int sl = 1 + rng() % 4;
      for (int i = 0; i < sl; ++i) st += alphabet[rng() % alphabet.size()];
    }
    const std::string want = CutAtFirst(text, stops);
    StopStrings s(stops);
    std::string got;
    size_t at = 0;
    while (at < text.size()) {
      const size_t n = std::min<size_t>(text.size() - at, 1 + rng() % 5);
      got += s.Push(std::string_view(text).substr(at, n));
      ASSERT_EQ(want.substr(0, got.size()), got) << "streamed text not a prefix of the answer";
      at += n;
    }
    got += s.Flush();
    ASSERT_EQ(got, want) << "text '" << text << "'";
    EXPECT_EQ(s.stopped(), want.size() != text.size());
  }
}

TEST(GenerationConfigTest, ReadsEosListAndSamplingDefaults) {
  auto g = GenerationConfig::FromJson(
      R"({"bos_token_id": 128000, "eos_token_id": [128001, 128009], "temperature": 0.6,
          "top_p": 0.9, "do_sample": true})",
      "gc");
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_EQ(g->eos_token_ids, (std::vector<int32_t>{128001, 128009}));
  EXPECT_EQ(g->bos_token_id, 128000);
  EXPECT_FLOAT_EQ(*g->temperature, 0.6f);
  EXPECT_FLOAT_EQ(*g->top_p, 0.9f);
  EXPECT_FALSE(g->top_k.has_value());
}

TEST(GenerationConfigTest, SingleEosAndErrors) {
  auto g = GenerationConfig::FromJson(R"({"eos_token_id": 2})", "gc");
  ASSERT_TRUE(g.ok());
  EXPECT_EQ(g->eos_token_ids, (std::vector<int32_t>{2}));
  EXPECT_FALSE(GenerationConfig::FromJson(R"({"eos_token_id": "x"})", "gc").ok());
  EXPECT_FALSE(GenerationConfig::FromJson(R"({"top_p": 0})", "gc").ok());
  EXPECT_FALSE(GenerationConfig::FromJson(R"({"temperature": -1})", "gc").ok());
  EXPECT_FALSE(GenerationConfig::FromJson("[1]", "gc").ok());
  auto bad = GenerationConfig::FromJson("{", "some/generation_config.json");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("some/generation_config.json"), std::string::npos);
}

TEST(GenerationConfigTest, FallsBackToConfigJson) {
  const std::string dir = testing::TempDir() + "/gencfg";
  std::filesystem::create_directories(dir);
  std::filesystem::remove(dir + "/generation_config.json");
  std::ofstream(dir + "/config.json") << R"({"bos_token_id": 1, "eos_token_id": 2})";
  auto g = GenerationConfig::LoadDir(dir);
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_EQ(g->eos_token_ids, (std::vector<int32_t>{2}));
  EXPECT_EQ(g->bos_token_id, 1);
  std::ofstream(dir + "/generation_config.json") << R"({"eos_token_id": [7, 8], "top_k": 20})";
  g = GenerationConfig::LoadDir(dir);
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_EQ(g->eos_token_ids, (std::vector<int32_t>{7, 8}));
  EXPECT_EQ(g->top_k, 20);
  EXPECT_EQ(g->bos_token_id, 1);  // from config.json
}

}  // namespace
}  // namespace moemesh
