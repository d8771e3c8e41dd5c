#include "services/text/text_model.h"

#include <filesystem>

#include "absl/strings/str_cat.h"
#include "services/common/status_macros.h"

namespace moemesh {

absl::StatusOr<std::shared_ptr<const TextModel>> TextModel::LoadDir(const std::string& dir,
                                                                    TextModelOptions options) {
  auto m = std::make_shared<TextModel>();
  ASSIGN_OR_RETURN(m->generation_, GenerationConfig::LoadDir(dir));
  std::error_code ec;
  if (std::filesystem::exists(dir + "/tokenizer.json", ec)) {
    ASSIGN_OR_RETURN(m->tokenizer_, Tokenizer::LoadDir(dir, options.tokenizer));
    std::string source = options.chat_template_override;
    std::string origin = "the --chat_template file";
    if (source.empty()) {
      source = m->tokenizer_->chat_template();
      origin = dir + "/tokenizer_config.json";
    }
    if (!source.empty()) {
      auto t = ChatTemplate::Parse(source);
      if (!t.ok())
        return absl::InvalidArgumentError(
            absl::StrCat("chat template of ", origin, ": ", t.status().message()));
      m->chat_template_ = *std::move(t);
    }
  } else if (!options.chat_template_override.empty()) {
    return absl::FailedPreconditionError(
        absl::StrCat(dir, " has no tokenizer.json, so a chat template cannot be used"));
  }
  m->eos_ids_ = m->generation_.eos_token_ids;
  if (m->eos_ids_.empty() && m->tokenizer_ && !m->tokenizer_->eos_token().empty()) {
    if (auto id = m->tokenizer_->TokenToId(m->tokenizer_->eos_token())) m->eos_ids_.push_back(*id);
  }
  return std::shared_ptr<const TextModel>(std::move(m));
}

absl::StatusOr<std::vector<int32_t>> TextModel::Encode(const std::string& text,
                                                       bool add_special_tokens) const {
  if (!tokenizer_)
    return absl::FailedPreconditionError("the model has no tokenizer.json; send token ids");
  return tokenizer_->Encode(text, add_special_tokens);
}

absl::StatusOr<std::string> TextModel::Decode(const std::vector<int32_t>& ids,
                                              bool skip_special_tokens) const {
  if (!tokenizer_) return absl::FailedPreconditionError("the model has no tokenizer.json");
  for (int32_t id : ids) {
    if (id < 0 || id >= tokenizer_->vocab_size())
      return absl::InvalidArgumentError(absl::StrCat(
          "token id ", id, " is outside the vocabulary [0, ", tokenizer_->vocab_size(), ")"));
  }
  return tokenizer_->Decode(ids, skip_special_tokens);
}

absl::StatusOr<nlohmann::ordered_json> NormaliseChatMessages(
    const nlohmann::ordered_json& messages) {
  if (!messages.is_array() || messages.empty())
    return absl::InvalidArgumentError("messages must be a non-empty array");
  nlohmann::ordered_json out = nlohmann::ordered_json::array();
  for (size_t i = 0; i < messages.size(); ++i) {
    const nlohmann::ordered_json& m = messages[i];
    const std::string where = absl::StrCat("messages[", i, "]");
    if (!m.is_object()) return absl::InvalidArgumentError(absl::StrCat(where, " is not an object"));
    auto role = m.find("role");
    if (role == m.end() || !role->is_string())
      return absl::InvalidArgumentError(absl::StrCat(where, " needs a string 'role'"));
    nlohmann::ordered_json n = m;
    auto content = m.find("content");
    if (content != m.end() && content->is_array()) {
      std::string text;
      for (const nlohmann::ordered_json& part : *content) {
        if (!part.is_object() || part.value("type", "") != "text" || !part.contains("text") ||
            !part["text"].is_string())
          return absl::InvalidArgumentError(
              absl::StrCat(where, ".content: only parts of type 'text' are supported"));
        text += part["text"].get<std::string>();
      }
      n["content"] = text;
    } else if (content != m.end() && !content->is_string() && !content->is_null()) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ".content must be a string, null or a list of text parts"));
    }
    out.push_back(std::move(n));
  }
  return out;
}

absl::StatusOr<std::string> TextModel::RenderChat(const nlohmann::ordered_json& messages,
                                                  bool add_generation_prompt,
                                                  const nlohmann::ordered_json& tools) const {
  if (!tokenizer_) return absl::FailedPreconditionError("the model has no tokenizer.json");
  if (!chat_template_)
    return absl::FailedPreconditionError(
        "the model has no chat template (tokenizer_config.json has no chat_template); send a "
        "prompt instead");
  ASSIGN_OR_RETURN(nlohmann::ordered_json msgs, NormaliseChatMessages(messages));
  nlohmann::ordered_json ctx = {{"messages", std::move(msgs)},
                                {"add_generation_prompt", add_generation_prompt},
                                {"bos_token", tokenizer_->bos_token()},
                                {"eos_token", tokenizer_->eos_token()}};
  if (!tools.is_null()) {
    if (!tools.is_array()) return absl::InvalidArgumentError("tools must be an array");
    ctx["tools"] = tools;
  }
  return chat_template_->Render(ctx);
}

absl::StatusOr<std::vector<int32_t>> TextModel::EncodeChat(
    const nlohmann::ordered_json& messages, bool add_generation_prompt,
    const nlohmann::ordered_json& tools) const {
  ASSIGN_OR_RETURN(std::string text, RenderChat(messages, add_generation_prompt, tools));
  return tokenizer_->Encode(text, /*add_special_tokens=*/false);
}

TextStream::TextStream(std::shared_ptr<const Tokenizer> tokenizer,
                       std::vector<std::string> stop_strings, bool skip_special_tokens)
    : decode_(std::move(tokenizer), skip_special_tokens), stops_(std::move(stop_strings)) {}

std::string TextStream::Push(int32_t id) {
  if (stops_.stopped()) return "";
  return stops_.Push(decode_.Push(id));
}

std::string TextStream::Finish() {
  if (stops_.stopped()) return "";
  std::string out = stops_.Push(decode_.Flush());
  if (stops_.stopped()) return out;
  return out + stops_.Flush();
}

}  // namespace moemesh
