// Regex: an Oniguruma pattern compiled once, searched from any number of threads.
//
// Oniguruma is the engine Hugging Face `tokenizers` uses, so `tokenizer.json` patterns
// (lookahead such as `\s+(?!\S)`, Unicode classes such as `\p{L}`, inline flags such as
// `(?i:'s|'t)`) mean exactly what they mean there. Patterns use Oniguruma's default syntax
// and UTF-8. FindAll walks matches like the Rust `onig` crate's find_iter: leftmost match
// from the end of the previous one, and an empty match right after a match is skipped.
//
// Thread-safety: immutable after Compile; Oniguruma searches on a shared regex_t are safe
// with a per-call region, which FindAll allocates.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace moemesh::text {

class Regex {
 public:
  using Span = std::pair<size_t, size_t>;  // [begin, end) byte offsets

  [[nodiscard]] static absl::StatusOr<std::unique_ptr<Regex>> Compile(std::string_view pattern);
  ~Regex();
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // Appends every match in `text` to `out` (cleared first). `text` must be valid UTF-8.
  [[nodiscard]] absl::Status FindAll(std::string_view text, std::vector<Span>* out) const;
  const std::string& pattern() const { return pattern_; }

 private:
  Regex() = default;
  void* regex_ = nullptr;  // OnigRegex; void* keeps oniguruma.h out of this header
  std::string pattern_;
};

// Pattern: the `{"String": …}` or `{"Regex": …}` object of tokenizer.json. A String pattern
// matches its text literally, left to right, without overlaps.
class Pattern {
 public:
  // `j` is the pattern object; `where` names it in errors.
  [[nodiscard]] static absl::StatusOr<Pattern> FromJson(const nlohmann::json& j,
                                                        std::string_view where);
  static Pattern MakeLiteral(std::string literal);
  [[nodiscard]] absl::Status FindAll(std::string_view text, std::vector<Regex::Span>* out) const;

 private:
  std::string literal_;
  std::shared_ptr<const Regex> regex_;
};

}  // namespace moemesh::text
