// Pre-tokenizers of tokenizer.json: Sequence, Split, ByteLevel, Metaspace, Digits.
//
// Splitting follows Hugging Face's NormalizedString::split: the pattern's matches and the
// text between them form a list of (span, is_match); `invert` flips the flags; the
// behaviour (Isolated, Removed, MergedWithPrevious, MergedWithNext, Contiguous) folds that
// list; empty spans are dropped.
#include <array>

#include "absl/strings/str_cat.h"
#include "services/common/status_macros.h"
#include "services/text/regex.h"
#include "services/text/stages.h"
#include "services/text/unicode.h"

namespace moemesh::text {
namespace {

using json = nlohmann::json;

enum class Behavior { kIsolated, kRemoved, kMergedWithPrevious, kMergedWithNext, kContiguous };

absl::StatusOr<Behavior> ParseBehavior(const std::string& s) {
  if (s == "Isolated") return Behavior::kIsolated;
  if (s == "Removed") return Behavior::kRemoved;
  if (s == "MergedWithPrevious") return Behavior::kMergedWithPrevious;
  if (s == "MergedWithNext") return Behavior::kMergedWithNext;
  if (s == "Contiguous") return Behavior::kContiguous;
  return absl::InvalidArgumentError(absl::StrCat("unsupported split behavior \"", s, "\""));
}

struct Span {
  size_t begin, end;
  bool is_match;
};

// Turns the matches in a text of `size` bytes into the covering list of spans.
std::vector<Span> Cover(const std::vector<Regex::Span>& matches, size_t size, bool invert) {
  std::vector<Span> spans;
  spans.reserve(matches.size() * 2 + 1);
  size_t prev = 0;
  for (const auto& [b, e] : matches) {
    if (prev != b) spans.push_back({prev, b, invert});
    spans.push_back({b, e, !invert});
    prev = e;
  }
  if (prev != size) spans.push_back({prev, size, invert});
  return spans;
}

std::vector<Span> ApplyBehavior(std::vector<Span> in, Behavior behavior) {
  std::vector<Span> out;
  out.reserve(in.size());
  bool previous_match = false;
  switch (behavior) {
    case Behavior::kIsolated:
      out = std::move(in);
      break;
    case Behavior::kRemoved:
      for (const Span& s : in)
        if (!s.is_match) out.push_back(s);
      break;
    case Behavior::kMergedWithPrevious:
      for (const Span& s : in) {
        if (s.is_match && !previous_match && !out.empty()) {
          out.back().end = s.end;
        } else {
          out.push_back(s);
        }
        previous_match = s.is_match;
      }
      break;
    case Behavior::kMergedWithNext:
      for (auto it = in.rbegin(); it != in.rend(); ++it) {
        if (it->is_match && !previous_match && !out.empty()) {
          out.back().begin = it->begin;
        } else {
          out.push_back(*it);
        }
        previous_match = it->is_match;
      }
      std::reverse(out.begin(), out.end());
      break;
    case Behavior::kContiguous:
      for (const Span& s : in) {
        if (s.is_match == previous_match && !out.empty()) {
          out.back().end = s.end;
        } else {
          out.push_back(s);
        }
        previous_match = s.is_match;
      }
      break;
  }
  return out;
}

// Replaces each piece by its spans under `matcher`, keeping non-empty ones.
template <typename Matcher>
absl::Status SplitPieces(std::vector<Piece>* pieces, Behavior behavior, bool invert,
                         const Matcher& matcher) {
  std::vector<Piece> out;
  out.reserve(pieces->size());
  std::vector<Regex::Span> matches;
  for (Piece& p : *pieces) {
    RETURN_IF_ERROR(matcher(p.text, &matches));
    for (const Span& s : ApplyBehavior(Cover(matches, p.text.size(), invert), behavior)) {
      if (s.begin == s.end) continue;
      out.push_back({p.text.substr(s.begin, s.end - s.begin), p.at_start && s.begin == 0});
    }
  }
  *pieces = std::move(out);
  return absl::OkStatus();
}

class SequencePreTokenizer final : public PreTokenizer {
 public:
  explicit SequencePreTokenizer(std::vector<std::unique_ptr<PreTokenizer>> parts)
      : parts_(std::move(parts)) {}
  absl::Status PreTokenize(std::vector<Piece>* pieces) const override {
    for (const auto& p : parts_) RETURN_IF_ERROR(p->PreTokenize(pieces));
    return absl::OkStatus();
  }

 private:
  std::vector<std::unique_ptr<PreTokenizer>> parts_;
};

class SplitPreTokenizer final : public PreTokenizer {
 public:
  SplitPreTokenizer(Pattern pattern, Behavior behavior, bool invert)
      : pattern_(std::move(pattern)), behavior_(behavior), invert_(invert) {}
  absl::Status PreTokenize(std::vector<Piece>* pieces) const override {
    return SplitPieces(
        pieces, behavior_, invert_,
        [this](std::string_view t, std::vector<Regex::Span>* m) { return pattern_.FindAll(t, m); });
  }

 private:
  Pattern pattern_;
  Behavior behavior_;
  bool invert_;
};

constexpr char kGpt2Pattern[] =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// Optionally adds a leading space and splits with GPT-2's pattern, then spells every byte
// with the byte-level alphabet.
class ByteLevelPreTokenizer final : public PreTokenizer {
 public:
  ByteLevelPreTokenizer(bool add_prefix_space, std::unique_ptr<Regex> regex)
      : add_prefix_space_(add_prefix_space), regex_(std::move(regex)) {}
  absl::Status PreTokenize(std::vector<Piece>* pieces) const override {
    if (add_prefix_space_) {
      for (Piece& p : *pieces) {
        if (p.text.empty() || p.text[0] != ' ') p.text.insert(0, " ");
      }
    }
    if (regex_ != nullptr) {
      RETURN_IF_ERROR(SplitPieces(pieces, Behavior::kIsolated, false,
                                  [this](std::string_view t, std::vector<Regex::Span>* m) {
                                    return regex_->FindAll(t, m);
                                  }));
    }
    for (Piece& p : *pieces) {
      std::string mapped;
      mapped.reserve(p.text.size() * 2);
      for (char c : p.text) mapped += ByteLevelSymbol(static_cast<uint8_t>(c));
      p.text = std::move(mapped);
    }
    return absl::OkStatus();
  }

 private:
  bool add_prefix_space_;
  std::unique_ptr<Regex> regex_;  // null when use_regex is false
};

enum class PrependScheme { kAlways, kFirst, kNever };

absl::StatusOr<PrependScheme> ParsePrependScheme(const json& j) {
  if (j.contains("prepend_scheme") && j["prepend_scheme"].is_string()) {
    const std::string s = j["prepend_scheme"].get<std::string>();
    if (s == "always") return PrependScheme::kAlways;
    if (s == "first") return PrependScheme::kFirst;
    if (s == "never") return PrependScheme::kNever;
    return absl::InvalidArgumentError(absl::StrCat("unsupported prepend_scheme \"", s, "\""));
  }
  // Older files say add_prefix_space instead.
  const bool add = j.value("add_prefix_space", true);
  return add ? PrependScheme::kAlways : PrependScheme::kNever;
}

class MetaspacePreTokenizer final : public PreTokenizer {
 public:
  MetaspacePreTokenizer(std::string replacement, PrependScheme scheme, bool split)
      : replacement_(std::move(replacement)), scheme_(scheme), split_(split) {}
  absl::Status PreTokenize(std::vector<Piece>* pieces) const override {
    for (Piece& p : *pieces) {
      std::string out;
      out.reserve(p.text.size() + replacement_.size());
      for (char c : p.text) {
        if (c == ' ') {
          out += replacement_;
        } else {
          out.push_back(c);
        }
      }
      const bool starts = out.compare(0, replacement_.size(), replacement_) == 0;
      if (!starts &&
          (scheme_ == PrependScheme::kAlways || (scheme_ == PrependScheme::kFirst && p.at_start))) {
        out.insert(0, replacement_);
      }
      p.text = std::move(out);
    }
    if (!split_) return absl::OkStatus();
    const Pattern pattern = Pattern::MakeLiteral(replacement_);
    return SplitPieces(pieces, Behavior::kMergedWithNext, false,
                       [&pattern](std::string_view t, std::vector<Regex::Span>* m) {
                         return pattern.FindAll(t, m);
                       });
  }

 private:
  std::string replacement_;
  PrependScheme scheme_;
  bool split_;
};

// Splits digits from the rest: each digit alone, or runs of digits together.
class DigitsPreTokenizer final : public PreTokenizer {
 public:
  explicit DigitsPreTokenizer(bool individual) : individual_(individual) {}
  absl::Status PreTokenize(std::vector<Piece>* pieces) const override {
    return SplitPieces(pieces, individual_ ? Behavior::kIsolated : Behavior::kContiguous, false,
                       [](std::string_view t, std::vector<Regex::Span>* m) {
                         m->clear();
                         for (size_t i = 0; i < t.size();) {
                           const size_t b = i;
                           const char32_t cp = NextCodePoint(t, &i);
                           if (IsNumeric(cp)) m->emplace_back(b, i);
                         }
                         return absl::OkStatus();
                       });
  }

 private:
  bool individual_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<PreTokenizer>> MakePreTokenizer(const json& j) {
  if (!j.is_object() || !j.contains("type") || !j["type"].is_string()) {
    return absl::InvalidArgumentError("pre_tokenizer without a \"type\"");
  }
  const std::string type = j["type"].get<std::string>();
  try {
    if (type == "Sequence") {
      std::vector<std::unique_ptr<PreTokenizer>> parts;
      for (const json& n : j.at("pretokenizers")) {
        ASSIGN_OR_RETURN(auto p, MakePreTokenizer(n));
        parts.push_back(std::move(p));
      }
      return std::make_unique<SequencePreTokenizer>(std::move(parts));
    }
    if (type == "Split") {
      ASSIGN_OR_RETURN(Pattern p, Pattern::FromJson(j.at("pattern"), "Split pre-tokenizer"));
      ASSIGN_OR_RETURN(Behavior b, ParseBehavior(j.at("behavior").get<std::string>()));
      return std::make_unique<SplitPreTokenizer>(std::move(p), b, j.value("invert", false));
    }
    if (type == "ByteLevel") {
      std::unique_ptr<Regex> regex;
      if (j.value("use_regex", true)) {
        ASSIGN_OR_RETURN(regex, Regex::Compile(kGpt2Pattern));
      }
      return std::make_unique<ByteLevelPreTokenizer>(j.value("add_prefix_space", true),
                                                     std::move(regex));
    }
    if (type == "Metaspace") {
      ASSIGN_OR_RETURN(PrependScheme scheme, ParsePrependScheme(j));
      return std::make_unique<MetaspacePreTokenizer>(j.value("replacement", "\u2581"), scheme,
                                                     j.value("split", true));
    }
    if (type == "Digits") {
      return std::make_unique<DigitsPreTokenizer>(j.value("individual_digits", false));
    }
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(type, " pre-tokenizer: ", e.what()));
  }
  return absl::InvalidArgumentError(absl::StrCat("unsupported pre_tokenizer type \"", type, "\""));
}

const std::string& ByteLevelSymbol(uint8_t b) {
  static const std::array<std::string, 256> table = [] {
    std::array<std::string, 256> t;
    int n = 0;
    for (int c = 0; c < 256; ++c) {
      const bool direct = (c >= '!' && c <= '~') || (c >= 0xA1 && c <= 0xAC) || (c >= 0xAE);
      AppendUtf8(direct ? c : 256 + n++, &t[c]);
    }
    return t;
  }();
  return table[b];
}

int ByteLevelByte(char32_t cp) {
  static const std::array<int, 512> inverse = [] {
    std::array<int, 512> inv;
    inv.fill(-1);
    for (int b = 0; b < 256; ++b) {
      size_t i = 0;
      inv[NextCodePoint(ByteLevelSymbol(static_cast<uint8_t>(b)), &i)] = b;
    }
    return inv;
  }();
  return cp < 512 ? inverse[cp] : -1;
}

}  // namespace moemesh::text
