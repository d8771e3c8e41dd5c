// Bpe: the BPE model of a Hugging Face tokenizer.json (`"model": {"type": "BPE", …}`).
//
// A pre-token is split into characters, each looked up in the vocabulary (continuing
// characters with `continuing_subword_prefix`); a character the vocabulary lacks becomes
// its `<0xNN>` byte tokens (`byte_fallback`), else `unk_token` (consecutive unknowns fused
// into one with `fuse_unk`), else it is dropped, as Hugging Face does. Merges are applied
// by rank with a priority queue, O(n log n) in the pre-token's length. With `ignore_merges`
// a pre-token that is itself in the vocabulary is one token.
//
// Merges may be written "a b" or ["a", "b"]. `dropout` must be absent or null.
//
// Thread-safety: Tokenize may be called from any number of threads; it shares a bounded
// cache of recent pre-tokens guarded by mutexes (sharded to keep contention low).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "nlohmann/json.hpp"

namespace moemesh::text {

class Bpe {
 public:
  // `model` is the "model" object; a malformed one is INVALID_ARGUMENT.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<Bpe>> FromJson(const nlohmann::json& model);

  // Appends the ids of one pre-token.
  void Tokenize(std::string_view word, std::vector<int32_t>* out) const;

  std::optional<int32_t> TokenToId(std::string_view token) const;
  // The vocabulary's spelling of `id`, or null when the model has no such id.
  const std::string* IdToToken(int32_t id) const;
  int32_t max_id() const { return static_cast<int32_t>(id_to_token_.size()) - 1; }

 private:
  struct MergeResult {
    int32_t rank;
    int32_t new_id;
  };
  static uint64_t PairKey(int32_t a, int32_t b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  }
  void TokenizeUncached(std::string_view word, std::vector<int32_t>* out) const;

  absl::flat_hash_map<std::string, int32_t> vocab_;
  std::vector<std::string> id_to_token_;
  std::vector<bool> has_id_;
  absl::flat_hash_map<uint64_t, MergeResult> merges_;
  std::optional<int32_t> unk_id_;
  bool fuse_unk_ = false;
  bool byte_fallback_ = false;
  bool ignore_merges_ = false;
  std::string continuing_subword_prefix_;
  std::string end_of_word_suffix_;
  int32_t byte_ids_[256];  // <0xNN> ids, -1 when absent

  static constexpr int kCacheShards = 16;
  static constexpr size_t kCacheCapacityPerShard = 4096;
  static constexpr size_t kMaxCachedWordBytes = 256;
  struct CacheShard {
    mutable absl::Mutex mu;
    absl::flat_hash_map<std::string, std::vector<int32_t>> map ABSL_GUARDED_BY(mu);
  };
  mutable std::unique_ptr<CacheShard[]> cache_;
};

}  // namespace moemesh::text
