#include "services/text/tokenizer.h"

#include <algorithm>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"
#include "services/common/status_macros.h"
#include "services/text/bpe.h"
#include "services/text/stages.h"
#include "services/text/unicode.h"

namespace moemesh {
namespace {

using json = nlohmann::json;

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// A tokenizer_config.json token: a string, or an AddedToken object with "content".
std::string ConfigToken(const json& config, const char* key) {
  if (!config.contains(key)) return "";
  const json& v = config[key];
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v["content"].is_string()) {
    return v["content"].get<std::string>();
  }
  return "";
}

// The transformers classes whose constructor rebuilds the post-processor from
// add_bos_token / add_eos_token (LlamaTokenizerFast.update_post_processor and its copies).
bool RebuildsPostProcessor(std::string cls) {
  if (cls.size() > 4 && cls.compare(cls.size() - 4, 4, "Fast") == 0) cls.resize(cls.size() - 4);
  return cls == "LlamaTokenizer" || cls == "CodeLlamaTokenizer" || cls == "GemmaTokenizer";
}

bool IsWordAt(std::string_view s, size_t i) {
  return i < s.size() && text::IsWordChar(text::NextCodePoint(s, &i));
}

bool IsWordBefore(std::string_view s, size_t end) {
  if (end == 0) return false;
  size_t b = end - 1;
  while (b > 0 && (static_cast<uint8_t>(s[b]) & 0xC0) == 0x80) --b;
  return text::IsWordChar(text::NextCodePoint(s, &b));
}

}  // namespace

Tokenizer::~Tokenizer() = default;

void Tokenizer::Trie::Insert(std::string_view s, int32_t token) {
  if (s.empty()) return;
  int32_t node = 0;
  for (char c : s) {
    const auto b = static_cast<uint8_t>(c);
    auto it = nodes[node].next.find(b);
    if (it == nodes[node].next.end()) {
      nodes.emplace_back();
      const auto child = static_cast<int32_t>(nodes.size() - 1);
      nodes[node].next[b] = child;
      node = child;
    } else {
      node = it->second;
    }
  }
  if (nodes[node].token < 0) nodes[node].token = token;  // the first token with a content wins
  first_byte[static_cast<uint8_t>(s[0])] = true;
}

absl::StatusOr<std::shared_ptr<const Tokenizer>> Tokenizer::LoadDir(const std::string& dir,
                                                                    TokenizerOptions o) {
  const std::string path = dir + "/tokenizer.json";
  ASSIGN_OR_RETURN(std::string tj, ReadFile(path));
  std::string config;
  const std::string config_path = dir + "/tokenizer_config.json";
  if (std::ifstream(config_path).good()) {
    ASSIGN_OR_RETURN(config, ReadFile(config_path));
  }
  return FromJson(tj, config, path, o);
}

absl::StatusOr<std::shared_ptr<const Tokenizer>> Tokenizer::FromJson(
    std::string_view tokenizer_json, std::string_view config_json, const std::string& source,
    TokenizerOptions o) {
  std::shared_ptr<Tokenizer> t(new Tokenizer());
  t->options_ = o;
  // A value of the wrong JSON type anywhere in the files (say an object where a string is
  // expected) makes nlohmann throw; that is a load error like any other, never a crash.
  absl::Status s;
  try {
    s = t->Init(tokenizer_json, config_json);
  } catch (const std::exception& e) {
    s = absl::InvalidArgumentError(absl::StrCat("malformed tokenizer files: ", e.what()));
  }
  RETURN_IF_ERROR(s, source);
  return std::shared_ptr<const Tokenizer>(std::move(t));
}

absl::Status Tokenizer::Init(std::string_view tokenizer_json, std::string_view config_json) {
  json j, config = json::object();
  try {
    j = json::parse(tokenizer_json);
    if (!config_json.empty()) config = json::parse(config_json);
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("bad JSON: ", e.what()));
  }
  if (!j.is_object() || !j.contains("model") || !j["model"].is_object()) {
    return absl::InvalidArgumentError("tokenizer.json has no \"model\"");
  }
  const json& model = j["model"];
  const std::string model_type = model.value("type", "BPE");
  if (model_type != "BPE") {
    return absl::InvalidArgumentError(absl::StrCat("unsupported model type \"", model_type, "\""));
  }
  ASSIGN_OR_RETURN(model_, text::Bpe::FromJson(model));
  if (j.contains("normalizer") && !j["normalizer"].is_null()) {
    ASSIGN_OR_RETURN(normalizer_, text::MakeNormalizer(j["normalizer"]));
  }
  if (j.contains("pre_tokenizer") && !j["pre_tokenizer"].is_null()) {
    ASSIGN_OR_RETURN(pre_tokenizer_, text::MakePreTokenizer(j["pre_tokenizer"]));
  }
  if (j.contains("post_processor") && !j["post_processor"].is_null()) {
    ASSIGN_OR_RETURN(post_processor_, text::MakePostProcessor(j["post_processor"]));
  }
  if (j.contains("decoder") && !j["decoder"].is_null()) {
    ASSIGN_OR_RETURN(decoder_, text::MakeDecoder(j["decoder"]));
  }

  int32_t max_id = model_->max_id();
  try {
    if (j.contains("added_tokens") && j["added_tokens"].is_array()) {
      for (const json& a : j["added_tokens"]) {
        AddedToken t;
        t.content = a.at("content").get<std::string>();
        const int64_t id = a.at("id").get<int64_t>();
        if (id < 0 || id >= (int64_t{1} << 24)) {
          return absl::InvalidArgumentError(absl::StrCat("added token id ", id, " out of range"));
        }
        t.id = static_cast<int32_t>(id);
        t.special = a.value("special", false);
        t.normalized = a.value("normalized", !t.special);
        t.lstrip = a.value("lstrip", false);
        t.rstrip = a.value("rstrip", false);
        t.single_word = a.value("single_word", false);
        if (t.content.empty()) continue;
        max_id = std::max(max_id, t.id);
        const auto index = static_cast<int32_t>(added_.size());
        added_by_content_[t.content] = t.id;
        added_by_id_[t.id] = index;
        added_.push_back(std::move(t));
      }
    }
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("added_tokens: ", e.what()));
  }
  vocab_size_ = max_id + 1;
  // Hugging Face puts special tokens first in its tries, then the others; the first token
  // with a given content wins.
  for (int pass = 0; pass < 2; ++pass) {
    for (size_t i = 0; i < added_.size(); ++i) {
      const AddedToken& t = added_[i];
      if (t.special != (pass == 0)) continue;
      if (!t.normalized) {
        raw_trie_.Insert(t.content, static_cast<int32_t>(i));
        continue;
      }
      std::string content = t.content;
      if (normalizer_ != nullptr) RETURN_IF_ERROR(normalizer_->Normalize(&content));
      normalized_trie_.Insert(content, static_cast<int32_t>(i));
    }
  }

  bos_token_ = ConfigToken(config, "bos_token");
  eos_token_ = ConfigToken(config, "eos_token");
  if (config.contains("chat_template")) {
    const json& ct = config["chat_template"];
    if (ct.is_string()) {
      chat_template_ = ct.get<std::string>();
    } else if (ct.is_array()) {
      for (const json& e : ct) {
        if (e.is_object() && e.value("name", "") == "default" && e.contains("template") &&
            e["template"].is_string()) {
          chat_template_ = e["template"].get<std::string>();
        }
      }
    }
  }
  const std::string cls =
      config.contains("tokenizer_class") && config["tokenizer_class"].is_string()
          ? config["tokenizer_class"].get<std::string>()
          : "";
  if (RebuildsPostProcessor(cls)) {
    const bool add_bos = config.value("add_bos_token", true);
    const bool add_eos = config.value("add_eos_token", false);
    std::vector<int32_t> prefix, suffix;
    for (const auto& [add, token, name, ids] : {std::tuple(add_bos, bos_token_, "bos", &prefix),
                                                std::tuple(add_eos, eos_token_, "eos", &suffix)}) {
      if (!add) continue;
      const std::optional<int32_t> id = TokenToId(token);
      if (token.empty() || !id.has_value()) {
        return absl::InvalidArgumentError(absl::StrCat("add_", name, "_token is true but ", name,
                                                       "_token \"", token,
                                                       "\" is not in the vocabulary"));
      }
      ids->push_back(*id);
    }
    post_processor_ = text::MakeTemplate(std::move(prefix), std::move(suffix));
  }
  return absl::OkStatus();
}

void Tokenizer::SplitAdded(const std::string& s, bool at_start, const Trie& trie,
                           std::vector<Segment>* out) const {
  if (trie.empty()) {
    out->push_back({s, -1, at_start});
    return;
  }
  size_t start_offset = 0;
  size_t i = 0;
  while (i < s.size()) {
    if (!trie.first_byte[static_cast<uint8_t>(s[i])]) {
      ++i;
      continue;
    }
    // Longest token starting at i.
    int32_t node = 0, best = -1;
    size_t best_end = 0;
    for (size_t k = i; k < s.size(); ++k) {
      auto it = trie.nodes[node].next.find(static_cast<uint8_t>(s[k]));
      if (it == trie.nodes[node].next.end()) break;
      node = it->second;
      if (trie.nodes[node].token >= 0) {
        best = trie.nodes[node].token;
        best_end = k + 1;
      }
    }
    if (best < 0) {
      ++i;
      continue;
    }
    const AddedToken& tok = added_[best];
    size_t start = i, stop = best_end;
    i = best_end;
    if (tok.single_word && (IsWordBefore(s, start) || IsWordAt(s, stop))) continue;
    if (tok.lstrip) {
      size_t b = start;
      while (b > 0) {
        size_t p = b - 1;
        while (p > 0 && (static_cast<uint8_t>(s[p]) & 0xC0) == 0x80) --p;
        size_t q = p;
        if (!text::IsWhitespace(text::NextCodePoint(s, &q))) break;
        b = p;
      }
      start = std::max(b, start_offset);
    }
    if (tok.rstrip) {
      while (stop < s.size()) {
        size_t q = stop;
        if (!text::IsWhitespace(text::NextCodePoint(s, &q))) break;
        stop = q;
      }
      i = stop;
    }
    if (start_offset < start) {
      out->push_back(
          {s.substr(start_offset, start - start_offset), -1, at_start && start_offset == 0});
    }
    out->push_back({"", tok.id, false});
    start_offset = stop;
  }
  if (start_offset < s.size() || s.empty()) {
    out->push_back({s.substr(start_offset), -1, at_start && start_offset == 0});
  }
}

absl::StatusOr<std::vector<int32_t>> Tokenizer::Encode(std::string_view input,
                                                       bool add_special_tokens) const {
  if (input.size() > options_.max_input_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("text of ", input.size(),
                                                   " bytes is longer than the limit of ",
                                                   options_.max_input_bytes, " bytes"));
  }
  if (!text::IsValidUtf8(input)) {
    return absl::InvalidArgumentError("text is not valid UTF-8");
  }
  std::vector<Segment> raw, segments;
  SplitAdded(std::string(input), true, raw_trie_, &raw);
  for (Segment& seg : raw) {
    if (seg.id >= 0) {
      segments.push_back(std::move(seg));
      continue;
    }
    if (normalizer_ != nullptr) RETURN_IF_ERROR(normalizer_->Normalize(&seg.text));
    SplitAdded(seg.text, seg.at_start, normalized_trie_, &segments);
  }
  std::vector<int32_t> ids;
  ids.reserve(input.size() / 3 + 4);
  std::vector<text::Piece> pieces;
  for (Segment& seg : segments) {
    if (seg.id >= 0) {
      ids.push_back(seg.id);
      continue;
    }
    if (seg.text.empty()) continue;
    pieces.clear();
    pieces.push_back({std::move(seg.text), seg.at_start});
    if (pre_tokenizer_ != nullptr) RETURN_IF_ERROR(pre_tokenizer_->PreTokenize(&pieces));
    for (const text::Piece& p : pieces) model_->Tokenize(p.text, &ids);
  }
  if (add_special_tokens && post_processor_ != nullptr) post_processor_->Process(&ids);
  return ids;
}

std::string Tokenizer::Decode(absl::Span<const int32_t> ids, bool skip_special_tokens) const {
  std::vector<std::string> tokens;
  tokens.reserve(ids.size());
  for (int32_t id : ids) {
    if (auto it = added_by_id_.find(id); it != added_by_id_.end()) {
      const AddedToken& t = added_[it->second];
      if (!(skip_special_tokens && t.special)) tokens.push_back(t.content);
      continue;
    }
    if (const std::string* t = model_->IdToToken(id); t != nullptr) tokens.push_back(*t);
  }
  if (decoder_ == nullptr) {
    std::string out;
    for (size_t i = 0; i < tokens.size(); ++i) {
      if (i > 0) out.push_back(' ');
      out += tokens[i];
    }
    return out;
  }
  decoder_->DecodeChain(&tokens);
  std::string out;
  for (const std::string& t : tokens) out += t;
  return out;
}

int Tokenizer::vocab_size() const { return vocab_size_; }

std::optional<int32_t> Tokenizer::TokenToId(std::string_view token) const {
  if (auto it = added_by_content_.find(absl::string_view(token.data(), token.size()));
      it != added_by_content_.end())
    return it->second;
  return model_->TokenToId(token);
}

std::optional<std::string> Tokenizer::IdToToken(int32_t id) const {
  if (auto it = added_by_id_.find(id); it != added_by_id_.end()) return added_[it->second].content;
  if (const std::string* t = model_->IdToToken(id); t != nullptr) return *t;
  return std::nullopt;
}

bool Tokenizer::IsSpecial(int32_t id) const {
  auto it = added_by_id_.find(id);
  return it != added_by_id_.end() && added_[it->second].special;
}

std::string Tokenizer::ByteLevelJson(int vocab_size) {
  json vocab = json::object();
  for (int b = 0; b < std::min(vocab_size, 256); ++b) {
    vocab[text::ByteLevelSymbol(static_cast<uint8_t>(b))] = b;
  }
  json added = json::array();
  for (int id = 256; id < vocab_size; ++id) {
    added.push_back({{"id", id},
                     {"content", absl::StrCat("<extra_", id, ">")},
                     {"special", true},
                     {"normalized", false},
                     {"lstrip", false},
                     {"rstrip", false},
                     {"single_word", false}});
  }
  json j = {{"version", "1.0"},
            {"added_tokens", added},
            {"normalizer", nullptr},
            {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}}},
            {"post_processor", nullptr},
            {"decoder", {{"type", "ByteLevel"}}},
            {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", json::array()}}}};
  return j.dump();
}

}  // namespace moemesh
