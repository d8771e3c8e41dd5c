// Tokenizer: byte-level BPE as in Hugging Face `tokenizer.json` (GPT-2 byte-to-unicode
// alphabet, ranked merges, added tokens).
//
// Merges are applied over the whole text without the GPT-2 regex pre-split, which is exact
// for merge-free vocabularies such as the generated models' and close for others. Encode
// fails with INVALID_ARGUMENT on a byte the vocabulary cannot express. Thread-safe after Load.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace moemesh {

class Tokenizer {
 public:
  [[nodiscard]] static absl::StatusOr<Tokenizer> Load(const std::string& path);
  [[nodiscard]] static absl::StatusOr<Tokenizer> FromJson(const std::string& text,
                                                          const std::string& source);
  // tokenizer.json text for a byte-level vocabulary of `vocab_size` ids: ids 0..255 are the
  // bytes (as far as the vocabulary reaches) and the rest are `<extra_N>` added tokens.
  static std::string ByteLevelJson(int vocab_size);

  [[nodiscard]] absl::StatusOr<std::vector<int32_t>> Encode(absl::string_view text) const;
  std::string Decode(const std::vector<int32_t>& ids) const;
  std::string DecodeOne(int32_t id) const { return Decode({id}); }
  int vocab_size() const { return static_cast<int>(id_to_token_.size()); }

 private:
  absl::flat_hash_map<std::string, int32_t> token_to_id_;
  std::vector<std::string> id_to_token_;  // byte-level unicode spelling
  std::vector<bool> is_added_;            // added tokens decode to their content verbatim
  absl::flat_hash_map<std::string, int> merge_rank_;  // "a b" -> rank
};

}  // namespace moemesh

namespace moemesh {

// Utf8Stream: turns decoded token bytes, arriving piece by piece, into valid UTF-8 text.
// An incomplete trailing character is held back until its remaining bytes arrive; bytes
// that can never form a character become U+FFFD. Not thread-safe; one per stream.
class Utf8Stream {
 public:
  // Returns the text that is complete so far.
  std::string Push(absl::string_view bytes);
  // Returns what is held back (as U+FFFD if incomplete) and resets.
  std::string Flush();

 private:
  std::string pending_;
};

}  // namespace moemesh
