#include "services/model/tokenizer.h"

#include <array>
#include <fstream>

#include "absl/strings/string_view.h"
#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace moemesh {
namespace {

using json = nlohmann::json;

// GPT-2's reversible map from bytes to printable code points.
const std::array<int, 256>& ByteToCodepoint() {
  static const std::array<int, 256> table = [] {
    std::array<int, 256> t{};
    std::array<bool, 256> direct{};
    for (int b = '!'; b <= '~'; ++b) direct[b] = true;
    for (int b = 0xA1; b <= 0xAC; ++b) direct[b] = true;
    for (int b = 0xAE; b <= 0xFF; ++b) direct[b] = true;
    int n = 0;
    for (int b = 0; b < 256; ++b) t[b] = direct[b] ? b : 256 + n++;
    return t;
  }();
  return table;
}

std::string EncodeUtf8(int cp) {
  std::string s;
  if (cp < 0x80) {
    s.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    s.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    s.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    s.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    s.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    s.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
  return s;
}

std::string ByteSymbol(uint8_t b) { return EncodeUtf8(ByteToCodepoint()[b]); }

// Splits a UTF-8 string into code points (invalid bytes map to themselves).
std::vector<int> DecodeUtf8(absl::string_view s) {
  std::vector<int> cps;
  for (size_t i = 0; i < s.size();) {
    const auto c = static_cast<uint8_t>(s[i]);
    int len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1;
    if (i + len > s.size()) len = 1;
    int cp = len == 1 ? c : len == 2 ? c & 0x1F : len == 3 ? c & 0x0F : c & 0x07;
    for (int k = 1; k < len; ++k) cp = (cp << 6) | (static_cast<uint8_t>(s[i + k]) & 0x3F);
    cps.push_back(cp);
    i += len;
  }
  return cps;
}

}  // namespace

absl::StatusOr<Tokenizer> Tokenizer::Load(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return FromJson(text, path);
}

absl::StatusOr<Tokenizer> Tokenizer::FromJson(const std::string& text, const std::string& source) {
  Tokenizer t;
  try {
    const json j = json::parse(text);
    const json& model = j.at("model");
    const json& vocab = model.at("vocab");
    auto put = [&](const std::string& tok, int64_t id, bool added) -> absl::Status {
      if (id < 0 || id > (1 << 24)) {
        return absl::InvalidArgumentError(absl::StrCat(source, ": token id ", id, " out of range"));
      }
      if (static_cast<size_t>(id) >= t.id_to_token_.size()) {
        t.id_to_token_.resize(id + 1);
        t.is_added_.resize(id + 1);
      }
      t.id_to_token_[id] = tok;
      t.is_added_[id] = added;
      t.token_to_id_[tok] = static_cast<int32_t>(id);
      return absl::OkStatus();
    };
    for (auto it = vocab.begin(); it != vocab.end(); ++it) {
      if (auto s = put(it.key(), it.value().get<int64_t>(), false); !s.ok()) return s;
    }
    if (j.contains("added_tokens") && j["added_tokens"].is_array()) {
      for (const json& a : j["added_tokens"]) {
        if (auto s = put(a.at("content").get<std::string>(), a.at("id").get<int64_t>(), true); !s.ok()) return s;
      }
    }
    if (model.contains("merges") && model["merges"].is_array()) {
      int rank = 0;
      for (const json& m : model["merges"]) {
        std::string key = m.is_string() ? m.get<std::string>()
                                        : m.at(0).get<std::string>() + " " + m.at(1).get<std::string>();
        t.merge_rank_.emplace(std::move(key), rank++);
      }
    }
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": bad tokenizer.json: ", e.what()));
  }
  return t;
}

std::string Tokenizer::ByteLevelJson(int vocab_size) {
  json vocab = json::object();
  for (int b = 0; b < std::min(vocab_size, 256); ++b) vocab[ByteSymbol(static_cast<uint8_t>(b))] = b;
  json added = json::array();
  for (int id = 256; id < vocab_size; ++id) {
    added.push_back({{"id", id}, {"content", absl::StrCat("<extra_", id, ">")}, {"special", true}});
  }
  json j = {{"version", "1.0"},
            {"added_tokens", added},
            {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}}},
            {"decoder", {{"type", "ByteLevel"}}},
            {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", json::array()}}}};
  return j.dump();
}

absl::StatusOr<std::vector<int32_t>> Tokenizer::Encode(absl::string_view text) const {
  std::vector<std::string> parts;
  parts.reserve(text.size());
  for (char c : text) parts.push_back(ByteSymbol(static_cast<uint8_t>(c)));
  if (!merge_rank_.empty()) {
    while (parts.size() > 1) {
      int best = -1, best_rank = INT32_MAX;
      for (size_t i = 0; i + 1 < parts.size(); ++i) {
        auto it = merge_rank_.find(absl::StrCat(parts[i], " ", parts[i + 1]));
        if (it != merge_rank_.end() && it->second < best_rank) {
          best_rank = it->second;
          best = static_cast<int>(i);
        }
      }
      if (best < 0) break;
      parts[best] += parts[best + 1];
      parts.erase(parts.begin() + best + 1);
    }
  }
  std::vector<int32_t> ids;
  ids.reserve(parts.size());
  for (size_t i = 0; i < parts.size(); ++i) {
    auto it = token_to_id_.find(parts[i]);
    if (it == token_to_id_.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("text has a character the vocabulary cannot express (piece ", i, ")"));
    }
    ids.push_back(it->second);
  }
  return ids;
}

std::string Tokenizer::Decode(const std::vector<int32_t>& ids) const {
  static const std::array<int, 512> inverse = [] {
    std::array<int, 512> inv;
    inv.fill(-1);
    const auto& fwd = ByteToCodepoint();
    for (int b = 0; b < 256; ++b) inv[fwd[b]] = b;
    return inv;
  }();
  std::string out;
  for (int32_t id : ids) {
    if (id < 0 || static_cast<size_t>(id) >= id_to_token_.size()) {
      absl::StrAppend(&out, "<unk:", id, ">");
      continue;
    }
    if (is_added_[id]) {
      out += id_to_token_[id];
      continue;
    }
    for (int cp : DecodeUtf8(id_to_token_[id])) {
      if (cp < 512 && inverse[cp] >= 0) out.push_back(static_cast<char>(inverse[cp]));
    }
  }
  return out;
}

}  // namespace moemesh
