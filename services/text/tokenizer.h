// Tokenizer: Hugging Face `tokenizers`, exactly, from a model folder's tokenizer.json and
// tokenizer_config.json.
//
//   ASSIGN_OR_RETURN(auto tok, Tokenizer::LoadDir("/models/mixtral"));
//   ASSIGN_OR_RETURN(std::vector<int32_t> ids, tok->Encode("Hello, world!"));
//   std::string text = tok->Decode(ids, /*skip_special_tokens=*/true);
//
// Encode runs the pipeline that tokenizer.json describes (stages.h, bpe.h): added tokens
// are cut out of the raw text first (non-normalized ones on the raw text, normalized ones
// on each normalized piece, longest match leftmost, honouring lstrip, rstrip and
// single_word), the rest is normalized, pre-tokenized and given to the BPE model, and with
// add_special_tokens the post-processor adds BOS/EOS. For the tokenizer classes whose
// Hugging Face `transformers` class rebuilds the post-processor from tokenizer_config.json
// (LlamaTokenizer[Fast], CodeLlamaTokenizer[Fast], GemmaTokenizer[Fast]) the add_bos_token
// and add_eos_token settings replace it the same way. Decode maps ids to tokens (unknown
// ids dropped, special tokens dropped with skip_special_tokens), runs the decoder chain and
// joins the result; it does not apply transformers' clean_up_tokenization_spaces.
//
// Encode refuses text that is not valid UTF-8 (Hugging Face takes Unicode strings) and text
// longer than TokenizerOptions::max_input_bytes, with INVALID_ARGUMENT before any work.
// A load error names the file and, for an unsupported stage, its type.
//
// Thread-safety: immutable after loading; every const method may run on any thread.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace moemesh {

namespace text {
class Normalizer;
class PreTokenizer;
class PostProcessor;
class Decoder;
class Bpe;
}  // namespace text

struct TokenizerOptions {
  size_t max_input_bytes = size_t{4} << 20;
};

class Tokenizer {
 public:
  // DIR/tokenizer.json and, when present, DIR/tokenizer_config.json.
  [[nodiscard]] static absl::StatusOr<std::shared_ptr<const Tokenizer>> LoadDir(
      const std::string& dir, TokenizerOptions o = {});
  // config_json may be empty (no tokenizer_config.json). `source` names the origin in errors.
  [[nodiscard]] static absl::StatusOr<std::shared_ptr<const Tokenizer>> FromJson(
      std::string_view tokenizer_json, std::string_view config_json, const std::string& source,
      TokenizerOptions o = {});
  // tokenizer.json text for a byte-level vocabulary of `vocab_size` ids: ids 0..255 are the
  // bytes (as far as the vocabulary reaches) and the rest are `<extra_N>` special tokens.
  static std::string ByteLevelJson(int vocab_size);

  ~Tokenizer();

  [[nodiscard]] absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text,
                                                            bool add_special_tokens = true) const;
  std::string Decode(absl::Span<const int32_t> ids, bool skip_special_tokens = false) const;

  int vocab_size() const;  // max id + 1 over vocab and added tokens
  std::optional<int32_t> TokenToId(std::string_view token) const;
  std::optional<std::string> IdToToken(int32_t id) const;
  bool IsSpecial(int32_t id) const;

  // From tokenizer_config.json (strings or {"content": …} objects); empty when absent.
  const std::string& bos_token() const { return bos_token_; }
  const std::string& eos_token() const { return eos_token_; }
  // The "default" entry when the config lists named templates.
  const std::string& chat_template() const { return chat_template_; }
  const TokenizerOptions& options() const { return options_; }

 private:
  struct AddedToken {
    std::string content;
    int32_t id = 0;
    bool special = false, normalized = false, lstrip = false, rstrip = false;
    bool single_word = false;
  };
  // Longest-match trie over added-token contents.
  struct Trie {
    struct Node {
      absl::flat_hash_map<uint8_t, int32_t> next;
      int32_t token = -1;  // index into added_
    };
    std::vector<Node> nodes{1};
    bool first_byte[256] = {};
    void Insert(std::string_view s, int32_t token);
    bool empty() const { return nodes.size() == 1; }
  };
  struct Segment {
    std::string text;
    int32_t id = -1;  // an added token's id, or -1 for text
    bool at_start = false;
  };

  Tokenizer() = default;
  [[nodiscard]] absl::Status Init(std::string_view tokenizer_json, std::string_view config_json);
  // Splits `s` on the added tokens of `trie`; appends segments to `out`.
  void SplitAdded(const std::string& s, bool at_start, const Trie& trie,
                  std::vector<Segment>* out) const;

  TokenizerOptions options_;
  std::unique_ptr<text::Normalizer> normalizer_;
  std::unique_ptr<text::PreTokenizer> pre_tokenizer_;
  std::unique_ptr<text::Bpe> model_;
  std::unique_ptr<text::PostProcessor> post_processor_;
  std::unique_ptr<text::Decoder> decoder_;

  std::vector<AddedToken> added_;
  absl::flat_hash_map<std::string, int32_t> added_by_content_;
  absl::flat_hash_map<int32_t, int32_t> added_by_id_;  // id -> index into added_
  Trie raw_trie_, normalized_trie_;
  int vocab_size_ = 0;

  std::string bos_token_, eos_token_, chat_template_;
};

// Incremental decoding: each Push returns new text, always valid UTF-8; concatenating all
// Push results then Flush() equals Decode(all ids) with the same skip_special_tokens. It
// holds back text while the decoded window ends in an incomplete character (byte-fallback
// tokens, multi-byte characters split across byte-level tokens), and decodes a window that
// starts one token before the new ones so that decoders with a first-token rule
// (Metaspace, Strip) see the same context Decode does, as Hugging Face's DecodeStream.
// Not thread-safe; one per stream.
class DecodeStream {
 public:
  explicit DecodeStream(std::shared_ptr<const Tokenizer> tok, bool skip_special_tokens = false);
  std::string Push(int32_t id);
  // Returns what is still held back and resets the stream.
  std::string Flush();

 private:
  std::shared_ptr<const Tokenizer> tok_;
  bool skip_special_tokens_;
  std::vector<int32_t> ids_;  // ids from the window's start
  size_t prefix_ = 0;         // ids_[0, prefix_) is context; ids_[prefix_, …) pending
  std::string prefix_text_;   // Decode(ids_[0, prefix_))
};

// Utf8Stream: turns decoded token bytes, arriving piece by piece, into valid UTF-8 text.
// An incomplete trailing character is held back until its remaining bytes arrive; bytes
// that can never form a character become U+FFFD. Not thread-safe; one per stream.
class Utf8Stream {
 public:
  // Returns the text that is complete so far.
  std::string Push(std::string_view bytes);
  // Returns what is held back (as U+FFFD if incomplete) and resets.
  std::string Flush();

 private:
  std::string pending_;
};

}  // namespace moemesh
