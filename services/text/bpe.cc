#include "services/text/bpe.h"

#include <queue>

#include "absl/hash/hash.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "services/text/unicode.h"

namespace moemesh::text {

using json = nlohmann::json;

namespace {
// Abseil's containers take absl::string_view, which this Abseil does not alias to std's.
absl::string_view Av(std::string_view s) { return absl::string_view(s.data(), s.size()); }
}  // namespace

absl::StatusOr<std::unique_ptr<Bpe>> Bpe::FromJson(const json& model) {
  std::unique_ptr<Bpe> b(new Bpe());
  try {
    if (model.contains("dropout") && !model["dropout"].is_null()) {
      return absl::InvalidArgumentError("BPE dropout is not supported");
    }
    for (auto it = model.at("vocab").begin(); it != model.at("vocab").end(); ++it) {
      const int64_t id = it.value().get<int64_t>();
      if (id < 0 || id >= (int64_t{1} << 24)) {
        return absl::InvalidArgumentError(absl::StrCat("vocab id ", id, " out of range"));
      }
      if (static_cast<size_t>(id) >= b->id_to_token_.size()) {
        b->id_to_token_.resize(id + 1);
        b->has_id_.resize(id + 1);
      }
      b->id_to_token_[id] = it.key();
      b->has_id_[id] = true;
      b->vocab_[it.key()] = static_cast<int32_t>(id);
    }
    auto str_or_empty = [&](const char* key) {
      return model.contains(key) && model[key].is_string() ? model[key].get<std::string>()
                                                           : std::string();
    };
    b->continuing_subword_prefix_ = str_or_empty("continuing_subword_prefix");
    b->end_of_word_suffix_ = str_or_empty("end_of_word_suffix");
    if (!b->end_of_word_suffix_.empty()) {
      return absl::InvalidArgumentError("BPE end_of_word_suffix is not supported");
    }
    const std::string unk = str_or_empty("unk_token");
    if (!unk.empty()) {
      auto it = b->vocab_.find(unk);
      if (it == b->vocab_.end()) {
        return absl::InvalidArgumentError(absl::StrCat("unk_token \"", unk, "\" not in vocab"));
      }
      b->unk_id_ = it->second;
    }
    b->fuse_unk_ = model.value("fuse_unk", false);
    b->byte_fallback_ = model.value("byte_fallback", false);
    b->ignore_merges_ = model.value("ignore_merges", false);
    for (int i = 0; i < 256; ++i) {
      auto it = b->vocab_.find(absl::StrFormat("<0x%02X>", i));
      b->byte_ids_[i] = it == b->vocab_.end() ? -1 : it->second;
    }
    const size_t prefix_len = b->continuing_subword_prefix_.size();
    int32_t rank = 0;
    if (model.contains("merges") && model["merges"].is_array()) {
      b->merges_.reserve(model["merges"].size());
      for (const json& m : model["merges"]) {
        std::string left, right;
        if (m.is_string()) {
          const std::string s = m.get<std::string>();
          const size_t sp = s.find(' ', 1);
          if (sp == std::string::npos) {
            return absl::InvalidArgumentError(absl::StrCat("merge \"", s, "\" has no space"));
          }
          left = s.substr(0, sp);
          right = s.substr(sp + 1);
        } else {
          left = m.at(0).get<std::string>();
          right = m.at(1).get<std::string>();
        }
        auto l = b->vocab_.find(left);
        auto r = b->vocab_.find(right);
        if (l == b->vocab_.end() || r == b->vocab_.end()) {
          return absl::InvalidArgumentError(
              absl::StrCat("merge \"", left, " ", right, "\" uses a token outside the vocab"));
        }
        std::string merged = left;
        merged += right.compare(0, prefix_len, b->continuing_subword_prefix_) == 0
                      ? right.substr(prefix_len)
                      : right;
        auto n = b->vocab_.find(merged);
        if (n == b->vocab_.end()) {
          return absl::InvalidArgumentError(
              absl::StrCat("merge result \"", merged, "\" not in vocab"));
        }
        b->merges_.try_emplace(PairKey(l->second, r->second), MergeResult{rank, n->second});
        ++rank;
      }
    }
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("BPE model: ", e.what()));
  }
  b->cache_ = std::make_unique<CacheShard[]>(kCacheShards);
  return b;
}

std::optional<int32_t> Bpe::TokenToId(std::string_view token) const {
  auto it = vocab_.find(Av(token));
  if (it == vocab_.end()) return std::nullopt;
  return it->second;
}

const std::string* Bpe::IdToToken(int32_t id) const {
  if (id < 0 || static_cast<size_t>(id) >= id_to_token_.size() || !has_id_[id]) return nullptr;
  return &id_to_token_[id];
}

void Bpe::Tokenize(std::string_view word, std::vector<int32_t>* out) const {
  if (word.empty()) return;
  if (ignore_merges_) {
    if (auto it = vocab_.find(Av(word)); it != vocab_.end()) {
      out->push_back(it->second);
      return;
    }
  }
  if (word.size() > kMaxCachedWordBytes) {
    TokenizeUncached(word, out);
    return;
  }
  CacheShard& shard = cache_[absl::HashOf(Av(word)) % kCacheShards];
  {
    absl::MutexLock lock(&shard.mu);
    if (auto it = shard.map.find(Av(word)); it != shard.map.end()) {
      out->insert(out->end(), it->second.begin(), it->second.end());
      return;
    }
  }
  const size_t before = out->size();
  TokenizeUncached(word, out);
  std::vector<int32_t> ids(out->begin() + before, out->end());
  absl::MutexLock lock(&shard.mu);
  if (shard.map.size() >= kCacheCapacityPerShard) shard.map.clear();
  shard.map.try_emplace(std::string(word), std::move(ids));
}

void Bpe::TokenizeUncached(std::string_view word, std::vector<int32_t>* out) const {
  // Symbols form a doubly linked list over the word; a merged-away symbol has len 0.
  struct Symbol {
    int32_t id;
    int prev, next;
    size_t len;
  };
  std::vector<Symbol> symbols;
  symbols.reserve(word.size());
  std::string key;
  bool last_unk = false;
  auto push = [&](int32_t id, size_t len) {
    const int idx = static_cast<int>(symbols.size());
    symbols.push_back({id, idx - 1, -1, len});
    if (idx > 0) symbols[idx - 1].next = idx;
  };
  for (size_t i = 0; i < word.size();) {
    const size_t b = i;
    const auto c = static_cast<uint8_t>(word[i]);
    i += c < 0x80 ? 1 : c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
    if (i > word.size()) i = word.size();
    const std::string_view ch = word.substr(b, i - b);
    std::string_view lookup = ch;
    if (b > 0 && !continuing_subword_prefix_.empty()) {
      key = continuing_subword_prefix_;
      key += ch;
      lookup = key;
    }
    if (auto it = vocab_.find(Av(lookup)); it != vocab_.end()) {
      push(it->second, ch.size());
      last_unk = false;
      continue;
    }
    if (byte_fallback_) {
      bool all = true;
      for (char byte : ch) all &= byte_ids_[static_cast<uint8_t>(byte)] >= 0;
      if (all) {
        for (char byte : ch) push(byte_ids_[static_cast<uint8_t>(byte)], 1);
        last_unk = false;
        continue;
      }
    }
    if (unk_id_.has_value()) {
      if (fuse_unk_ && last_unk && !symbols.empty()) {
        symbols.back().len += ch.size();
      } else {
        push(*unk_id_, ch.size());
      }
      last_unk = true;
    }
  }

  struct Candidate {
    int32_t rank;
    int pos;
    int32_t new_id;
    bool operator>(const Candidate& o) const {
      return rank != o.rank ? rank > o.rank : pos > o.pos;
    }
  };
  // The initial candidates are heapified at once (O(n)); merges then push at most two each.
  std::vector<Candidate> initial;
  initial.reserve(symbols.size());
  for (int i = 0; i + 1 < static_cast<int>(symbols.size()); ++i) {
    auto it = merges_.find(PairKey(symbols[i].id, symbols[i + 1].id));
    if (it != merges_.end()) initial.push_back({it->second.rank, i, it->second.new_id});
  }
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> queue(
      std::greater<Candidate>(), std::move(initial));
  auto consider = [&](int left) {
    if (left < 0) return;
    const int right = symbols[left].next;
    if (right < 0) return;
    auto it = merges_.find(PairKey(symbols[left].id, symbols[right].id));
    if (it != merges_.end()) queue.push({it->second.rank, left, it->second.new_id});
  };
  while (!queue.empty()) {
    const Candidate top = queue.top();
    queue.pop();
    Symbol& left = symbols[top.pos];
    if (left.len == 0 || left.next < 0) continue;
    Symbol& right = symbols[left.next];
    auto it = merges_.find(PairKey(left.id, right.id));
    if (it == merges_.end() || it->second.new_id != top.new_id) continue;  // stale
    left.id = top.new_id;
    left.len += right.len;
    right.len = 0;
    left.next = right.next;
    if (left.next >= 0) symbols[left.next].prev = top.pos;
    consider(left.prev);
    consider(top.pos);
  }
  for (const Symbol& s : symbols) {
    if (s.len > 0) out->push_back(s.id);
  }
}

}  // namespace moemesh::text
