// Normalizers of tokenizer.json: Sequence, Prepend, Replace, NFC, NFD, NFKC, NFKD.
#include "absl/strings/str_cat.h"
#include "services/common/status_macros.h"
#include "services/text/regex.h"
#include "services/text/stages.h"
#include "services/text/unicode.h"

namespace moemesh::text {
namespace {

using json = nlohmann::json;

class SequenceNormalizer final : public Normalizer {
 public:
  explicit SequenceNormalizer(std::vector<std::unique_ptr<Normalizer>> parts)
      : parts_(std::move(parts)) {}
  absl::Status Normalize(std::string* s) const override {
    for (const auto& p : parts_) RETURN_IF_ERROR(p->Normalize(s));
    return absl::OkStatus();
  }

 private:
  std::vector<std::unique_ptr<Normalizer>> parts_;
};

// Prepends its string to any non-empty text.
class PrependNormalizer final : public Normalizer {
 public:
  explicit PrependNormalizer(std::string prefix) : prefix_(std::move(prefix)) {}
  absl::Status Normalize(std::string* s) const override {
    if (!s->empty()) s->insert(0, prefix_);
    return absl::OkStatus();
  }

 private:
  std::string prefix_;
};

class ReplaceNormalizer final : public Normalizer {
 public:
  ReplaceNormalizer(Pattern pattern, std::string content)
      : pattern_(std::move(pattern)), content_(std::move(content)) {}
  absl::Status Normalize(std::string* s) const override {
    std::vector<Regex::Span> spans;
    RETURN_IF_ERROR(pattern_.FindAll(*s, &spans));
    if (spans.empty()) return absl::OkStatus();
    std::string out;
    out.reserve(s->size());
    size_t prev = 0;
    for (const auto& [b, e] : spans) {
      out.append(*s, prev, b - prev);
      out += content_;
      prev = e;
    }
    out.append(*s, prev, std::string::npos);
    *s = std::move(out);
    return absl::OkStatus();
  }

 private:
  Pattern pattern_;
  std::string content_;
};

class UnicodeNormalizer final : public Normalizer {
 public:
  explicit UnicodeNormalizer(NormalForm form) : form_(form) {}
  absl::Status Normalize(std::string* s) const override {
    ASSIGN_OR_RETURN(*s, text::Normalize(*s, form_));
    return absl::OkStatus();
  }

 private:
  NormalForm form_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Normalizer>> MakeNormalizer(const json& j) {
  if (!j.is_object() || !j.contains("type") || !j["type"].is_string()) {
    return absl::InvalidArgumentError("normalizer without a \"type\"");
  }
  const std::string type = j["type"].get<std::string>();
  try {
    if (type == "Sequence") {
      std::vector<std::unique_ptr<Normalizer>> parts;
      for (const json& n : j.at("normalizers")) {
        ASSIGN_OR_RETURN(auto p, MakeNormalizer(n));
        parts.push_back(std::move(p));
      }
      return std::make_unique<SequenceNormalizer>(std::move(parts));
    }
    if (type == "Prepend") {
      return std::make_unique<PrependNormalizer>(j.at("prepend").get<std::string>());
    }
    if (type == "Replace") {
      ASSIGN_OR_RETURN(Pattern p, Pattern::FromJson(j.at("pattern"), "Replace normalizer"));
      return std::make_unique<ReplaceNormalizer>(std::move(p), j.at("content").get<std::string>());
    }
    if (type == "NFC") return std::make_unique<UnicodeNormalizer>(NormalForm::kNfc);
    if (type == "NFD") return std::make_unique<UnicodeNormalizer>(NormalForm::kNfd);
    if (type == "NFKC") return std::make_unique<UnicodeNormalizer>(NormalForm::kNfkc);
    if (type == "NFKD") return std::make_unique<UnicodeNormalizer>(NormalForm::kNfkd);
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(type, " normalizer: ", e.what()));
  }
  return absl::InvalidArgumentError(absl::StrCat("unsupported normalizer type \"", type, "\""));
}

}  // namespace moemesh::text
