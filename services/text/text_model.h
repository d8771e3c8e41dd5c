// TextModel: everything a model directory says about text — its tokenizer (tokenizer.json and
// tokenizer_config.json), its chat template and its generation defaults
// (generation_config.json) — behind one object that the gateway, the CLI and the HTTP API share.
//
// TextStream turns the tokens of one generation into text as they arrive: always valid UTF-8,
// special tokens skipped, and stop strings cut out (the stream never shows part of one).
//
// Thread-safety: a TextModel is immutable after LoadDir and may be used from any thread. A
// TextStream belongs to one request.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"
#include "services/text/chat_template.h"
#include "services/text/generation_config.h"
#include "services/text/stop_strings.h"
#include "services/text/tokenizer.h"

namespace moemesh {

struct TextModelOptions {
  TokenizerOptions tokenizer;
  // When set, replaces tokenizer_config.json's chat_template (a Jinja source text).
  std::string chat_template_override;
};

class TextModel {
 public:
  // Reads what DIR has. Without tokenizer.json, tokenizer() is null and text requests fail
  // with FAILED_PRECONDITION; a malformed file (tokenizer, template, generation config) is an
  // error that names it.
  [[nodiscard]] static absl::StatusOr<std::shared_ptr<const TextModel>> LoadDir(
      const std::string& dir, TextModelOptions options = {});

  const std::shared_ptr<const Tokenizer>& tokenizer() const { return tokenizer_; }
  const GenerationConfig& generation() const { return generation_; }
  bool has_chat_template() const { return chat_template_.has_value(); }
  // EOS ids from generation_config.json (or config.json), else the tokenizer's eos_token.
  const std::vector<int32_t>& eos_token_ids() const { return eos_ids_; }

  // Tokenizes a prompt. FAILED_PRECONDITION without a tokenizer; INVALID_ARGUMENT for text
  // over the tokenizer's input limit.
  [[nodiscard]] absl::StatusOr<std::vector<int32_t>> Encode(const std::string& text,
                                                            bool add_special_tokens = true) const;
  [[nodiscard]] absl::StatusOr<std::string> Decode(const std::vector<int32_t>& ids,
                                                   bool skip_special_tokens = false) const;

  // The chat template applied as Hugging Face's apply_chat_template does. `messages` is a JSON
  // array of objects with a string "role"; `tools` is null (absent) or an array. Template
  // errors (raise_exception, a bad role order) are INVALID_ARGUMENT with the template's message.
  [[nodiscard]] absl::StatusOr<std::string> RenderChat(
      const nlohmann::ordered_json& messages, bool add_generation_prompt,
      const nlohmann::ordered_json& tools = nullptr) const;
  // The rendered chat, tokenized with add_special_tokens=false (the template writes BOS itself).
  [[nodiscard]] absl::StatusOr<std::vector<int32_t>> EncodeChat(
      const nlohmann::ordered_json& messages, bool add_generation_prompt,
      const nlohmann::ordered_json& tools = nullptr) const;

 private:
  std::shared_ptr<const Tokenizer> tokenizer_;
  std::optional<ChatTemplate> chat_template_;
  GenerationConfig generation_;
  std::vector<int32_t> eos_ids_;
};

// Checks a chat's messages: a non-empty JSON array of objects, each with a string "role" and a
// "content" that is a string, null or absent, or a list of {"type":"text","text":…} parts
// (joined into one string, as OpenAI clients send them). Returns the normalised messages.
[[nodiscard]] absl::StatusOr<nlohmann::ordered_json> NormaliseChatMessages(
    const nlohmann::ordered_json& messages);

class TextStream {
 public:
  // `tokenizer` must not be null. Empty stop strings are ignored.
  TextStream(std::shared_ptr<const Tokenizer> tokenizer, std::vector<std::string> stop_strings,
             bool skip_special_tokens = true);

  // The text that one more generated token makes safe to show (possibly empty). Once a stop
  // string is found, stopped() is true and nothing more is returned.
  std::string Push(int32_t id);
  // The end of the generation: the rest of the text (an incomplete character becomes U+FFFD).
  std::string Finish();
  bool stopped() const { return stops_.stopped(); }
  const std::string& matched_stop() const { return stops_.matched(); }

 private:
  DecodeStream decode_;
  StopStrings stops_;
};

}  // namespace moemesh
