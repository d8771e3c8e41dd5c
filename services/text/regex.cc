#include "services/text/regex.h"

#include <oniguruma.h>

#include <mutex>

#include "absl/strings/str_cat.h"

namespace moemesh::text {
namespace {

void InitOnigurumaOnce() {
  static std::once_flag once;
  std::call_once(once, [] {
    OnigEncoding encodings[] = {ONIG_ENCODING_UTF8};
    onig_initialize(encodings, 1);
  });
}

std::string OnigMessage(int code, OnigErrorInfo* info) {
  UChar buf[ONIG_MAX_ERROR_MESSAGE_LEN];
  const int n =
      info != nullptr ? onig_error_code_to_str(buf, code, info) : onig_error_code_to_str(buf, code);
  return std::string(reinterpret_cast<char*>(buf), n > 0 ? n : 0);
}

}  // namespace

absl::StatusOr<std::unique_ptr<Regex>> Regex::Compile(std::string_view pattern) {
  InitOnigurumaOnce();
  std::unique_ptr<Regex> r(new Regex());
  r->pattern_ = std::string(pattern);
  OnigRegex reg = nullptr;
  OnigErrorInfo info;
  const auto* p = reinterpret_cast<const UChar*>(r->pattern_.data());
  const int rc = onig_new(&reg, p, p + r->pattern_.size(), ONIG_OPTION_CAPTURE_GROUP,
                          ONIG_ENCODING_UTF8, ONIG_SYNTAX_DEFAULT, &info);
  if (rc != ONIG_NORMAL) {
    return absl::InvalidArgumentError(
        absl::StrCat("bad regex '", std::string(pattern), "': ", OnigMessage(rc, &info)));
  }
  r->regex_ = reg;
  return r;
}

Regex::~Regex() {
  if (regex_ != nullptr) onig_free(static_cast<OnigRegex>(regex_));
}

absl::Status Regex::FindAll(std::string_view text, std::vector<Span>* out) const {
  out->clear();
  auto* reg = static_cast<OnigRegex>(regex_);
  OnigRegion* region = onig_region_new();
  const auto* str = reinterpret_cast<const UChar*>(text.data());
  const UChar* end = str + text.size();
  size_t pos = 0;
  bool have_last = false;
  size_t last_end = 0;
  absl::Status status;
  while (pos <= text.size()) {
    const int r = onig_search(reg, str, end, str + pos, end, region, ONIG_OPTION_NONE);
    if (r == ONIG_MISMATCH) break;
    if (r < 0) {
      status = absl::InternalError(
          absl::StrCat("regex '", pattern_, "' failed: ", OnigMessage(r, nullptr)));
      break;
    }
    const auto b = static_cast<size_t>(region->beg[0]);
    const auto e = static_cast<size_t>(region->end[0]);
    if (b == e && have_last && last_end == e) {
      // An empty match where the previous one ended: step one character and search again.
      if (pos >= text.size()) break;
      const auto c = static_cast<uint8_t>(text[pos]);
      pos += c < 0x80 ? 1 : c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : 2;
      continue;
    }
    out->emplace_back(b, e);
    have_last = true;
    last_end = e;
    pos = e;
  }
  onig_region_free(region, 1);
  return status;
}

Pattern Pattern::MakeLiteral(std::string literal) {
  Pattern p;
  p.literal_ = std::move(literal);
  return p;
}

absl::StatusOr<Pattern> Pattern::FromJson(const nlohmann::json& j, std::string_view where) {
  if (j.is_object() && j.contains("String") && j["String"].is_string()) {
    return MakeLiteral(j["String"].get<std::string>());
  }
  if (j.is_object() && j.contains("Regex") && j["Regex"].is_string()) {
    auto r = Regex::Compile(j["Regex"].get<std::string>());
    if (!r.ok())
      return absl::InvalidArgumentError(
          absl::StrCat(std::string(where), ": ", r.status().message()));
    Pattern p;
    p.regex_ = std::shared_ptr<const Regex>(std::move(*r));
    return p;
  }
  return absl::InvalidArgumentError(
      absl::StrCat(std::string(where), ": pattern must be {\"String\": …} or {\"Regex\": …}"));
}

absl::Status Pattern::FindAll(std::string_view text, std::vector<Regex::Span>* out) const {
  if (regex_ != nullptr) return regex_->FindAll(text, out);
  out->clear();
  if (literal_.empty()) return absl::OkStatus();
  for (size_t pos = text.find(literal_); pos != std::string_view::npos;
       pos = text.find(literal_, pos + literal_.size())) {
    out->emplace_back(pos, pos + literal_.size());
  }
  return absl::OkStatus();
}

}  // namespace moemesh::text
