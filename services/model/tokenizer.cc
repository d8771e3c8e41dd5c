#include "services/model/tokenizer.h"

#include <array>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
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
        if (auto s = put(a.at("content").get<std::string>(), a.at("id").get<int64_t>(), true);
            !s.ok())
          return s;
      }
    }
    if (model.contains("merges") && model["merges"].is_array()) {
      int rank = 0;
      for (const json& m : model["merges"]) {
        std::string key = m.is_string()
                              ? m.get<std::string>()
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
  for (int b = 0; b < std::min(vocab_size, 256); ++b)
    vocab[ByteSymbol(static_cast<uint8_t>(b))] = b;
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

namespace moemesh {
namespace {

// Length of the UTF-8 sequence starting with `c`, or 0 if `c` cannot start one.
int Utf8Len(uint8_t c) {
  if (c < 0x80) return 1;
  if (c >= 0xC2 && c <= 0xDF) return 2;
  if (c >= 0xE0 && c <= 0xEF) return 3;
  if (c >= 0xF0 && c <= 0xF4) return 4;
  return 0;
}

}  // namespace

std::string Utf8Stream::Push(absl::string_view bytes) {
  pending_.append(bytes.data(), bytes.size());
  std::string out;
  size_t i = 0;
  while (i < pending_.size()) {
    const auto c = static_cast<uint8_t>(pending_[i]);
    const int len = Utf8Len(c);
    if (len == 0) {
      out += "\xEF\xBF\xBD";
      ++i;
      continue;
    }
    if (i + len > pending_.size()) {
      // Possibly incomplete: keep it if the bytes so far are valid continuations.
      bool ok = true;
      for (size_t k = i + 1; k < pending_.size(); ++k)
        ok &= (static_cast<uint8_t>(pending_[k]) & 0xC0) == 0x80;
      if (ok) break;
      out += "\xEF\xBF\xBD";
      ++i;
      continue;
    }
    bool ok = true;
    for (int k = 1; k < len; ++k) ok &= (static_cast<uint8_t>(pending_[i + k]) & 0xC0) == 0x80;
    // Reject overlong 3/4-byte forms and surrogates (0xE0 needs >= 0xA0, 0xED < 0xA0, 0xF0 >= 0x90,
    // 0xF4 < 0x90).
    if (ok && len >= 3) {
      const auto c1 = static_cast<uint8_t>(pending_[i + 1]);
      if ((c == 0xE0 && c1 < 0xA0) || (c == 0xED && c1 >= 0xA0) || (c == 0xF0 && c1 < 0x90) ||
          (c == 0xF4 && c1 >= 0x90)) {
        ok = false;
      }
    }
    if (!ok) {
      out += "\xEF\xBF\xBD";
      ++i;
      continue;
    }
    out.append(pending_, i, len);
    i += len;
  }
  pending_.erase(0, i);
  return out;
}

std::string Utf8Stream::Flush() {
  std::string out = pending_.empty() ? "" : "\xEF\xBF\xBD";
  pending_.clear();
  return out;
}

}  // namespace moemesh
