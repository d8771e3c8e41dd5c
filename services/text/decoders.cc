// Decoders (ByteLevel, Metaspace, Replace, ByteFallback, Fuse, Strip, Sequence) and
// post-processors (TemplateProcessing, ByteLevel, Sequence) of tokenizer.json.
#include "absl/strings/str_cat.h"
#include "services/common/status_macros.h"
#include "services/text/regex.h"
#include "services/text/stages.h"
#include "services/text/unicode.h"

namespace moemesh::text {
namespace {

using json = nlohmann::json;

class SequenceDecoder final : public Decoder {
 public:
  explicit SequenceDecoder(std::vector<std::unique_ptr<Decoder>> parts)
      : parts_(std::move(parts)) {}
  void DecodeChain(std::vector<std::string>* tokens) const override {
    for (const auto& p : parts_) p->DecodeChain(tokens);
  }

 private:
  std::vector<std::unique_ptr<Decoder>> parts_;
};

// Byte-level spellings back to bytes; a token with any other character keeps its own
// UTF-8 bytes. The bytes of all tokens are joined and read as lossy UTF-8.
class ByteLevelDecoder final : public Decoder {
 public:
  void DecodeChain(std::vector<std::string>* tokens) const override {
    std::string bytes;
    std::string tok_bytes;
    for (const std::string& t : *tokens) {
      tok_bytes.clear();
      bool all = true;
      for (size_t i = 0; i < t.size();) {
        const int b = ByteLevelByte(NextCodePoint(t, &i));
        if (b < 0) {
          all = false;
          break;
        }
        tok_bytes.push_back(static_cast<char>(b));
      }
      bytes += all ? tok_bytes : t;
    }
    tokens->assign(1, Utf8Lossy(bytes));
  }
};

class MetaspaceDecoder final : public Decoder {
 public:
  MetaspaceDecoder(std::string replacement, bool prepend)
      : replacement_(std::move(replacement)), prepend_(prepend) {}
  void DecodeChain(std::vector<std::string>* tokens) const override {
    for (size_t k = 0; k < tokens->size(); ++k) {
      std::string& t = (*tokens)[k];
      std::string out;
      out.reserve(t.size());
      for (size_t i = 0; i < t.size();) {
        if (t.compare(i, replacement_.size(), replacement_) == 0) {
          // The first token loses its replacement characters when a prefix was prepended.
          if (!(k == 0 && prepend_)) out.push_back(' ');
          i += replacement_.size();
        } else {
          out.push_back(t[i++]);
        }
      }
      t = std::move(out);
    }
  }

 private:
  std::string replacement_;
  bool prepend_;
};

class ReplaceDecoder final : public Decoder {
 public:
  ReplaceDecoder(Pattern pattern, std::string content)
      : pattern_(std::move(pattern)), content_(std::move(content)) {}
  void DecodeChain(std::vector<std::string>* tokens) const override {
    std::vector<Regex::Span> spans;
    for (std::string& t : *tokens) {
      if (!pattern_.FindAll(t, &spans).ok() || spans.empty()) continue;
      std::string out;
      size_t prev = 0;
      for (const auto& [b, e] : spans) {
        out.append(t, prev, b - prev);
        out += content_;
        prev = e;
      }
      out.append(t, prev, std::string::npos);
      t = std::move(out);
    }
  }

 private:
  Pattern pattern_;
  std::string content_;
};

// Runs of <0xNN> tokens become the UTF-8 text they spell, or one U+FFFD per byte when
// they do not spell valid UTF-8.
class ByteFallbackDecoder final : public Decoder {
 public:
  void DecodeChain(std::vector<std::string>* tokens) const override {
    std::vector<std::string> out;
    out.reserve(tokens->size());
    std::string bytes;
    size_t n_bytes = 0;
    auto flush = [&] {
      if (n_bytes == 0) return;
      if (IsValidUtf8(bytes)) {
        out.push_back(bytes);
      } else {
        for (size_t i = 0; i < n_bytes; ++i) out.push_back("\xEF\xBF\xBD");
      }
      bytes.clear();
      n_bytes = 0;
    };
    for (std::string& t : *tokens) {
      int b = -1;
      if (t.size() == 6 && t.compare(0, 3, "<0x") == 0 && t[5] == '>') {
        auto hex = [](char c) {
          if (c >= '0' && c <= '9') return c - '0';
          if (c >= 'A' && c <= 'F') return c - 'A' + 10;
          if (c >= 'a' && c <= 'f') return c - 'a' + 10;
          return -1;
        };
        const int hi = hex(t[3]), lo = hex(t[4]);
        if (hi >= 0 && lo >= 0) b = hi * 16 + lo;
      }
      if (b >= 0) {
        bytes.push_back(static_cast<char>(b));
        ++n_bytes;
      } else {
        flush();
        out.push_back(std::move(t));
      }
    }
    flush();
    *tokens = std::move(out);
  }
};

class FuseDecoder final : public Decoder {
 public:
  void DecodeChain(std::vector<std::string>* tokens) const override {
    std::string all;
    for (const std::string& t : *tokens) all += t;
    tokens->assign(1, std::move(all));
  }
};

// Removes up to `start` leading and `stop` trailing copies of one character per token.
class StripDecoder final : public Decoder {
 public:
  StripDecoder(std::string content, int start, int stop)
      : content_(std::move(content)), start_(start), stop_(stop) {}
  void DecodeChain(std::vector<std::string>* tokens) const override {
    if (content_.empty()) return;
    const size_t n = content_.size();
    for (std::string& t : *tokens) {
      size_t b = 0, e = t.size();
      for (int k = 0; k < start_ && e - b >= n && t.compare(b, n, content_) == 0; ++k) b += n;
      for (int k = 0; k < stop_ && e - b >= n && t.compare(e - n, n, content_) == 0; ++k) e -= n;
      t = t.substr(b, e - b);
    }
  }

 private:
  std::string content_;
  int start_, stop_;
};

class TemplatePostProcessor final : public PostProcessor {
 public:
  TemplatePostProcessor(std::vector<int32_t> prefix, std::vector<int32_t> suffix)
      : prefix_(std::move(prefix)), suffix_(std::move(suffix)) {}
  void Process(std::vector<int32_t>* ids) const override {
    ids->insert(ids->begin(), prefix_.begin(), prefix_.end());
    ids->insert(ids->end(), suffix_.begin(), suffix_.end());
  }

 private:
  std::vector<int32_t> prefix_, suffix_;
};

class SequencePostProcessor final : public PostProcessor {
 public:
  explicit SequencePostProcessor(std::vector<std::unique_ptr<PostProcessor>> parts)
      : parts_(std::move(parts)) {}
  void Process(std::vector<int32_t>* ids) const override {
    for (const auto& p : parts_) p->Process(ids);
  }

 private:
  std::vector<std::unique_ptr<PostProcessor>> parts_;
};

// ByteLevel post-processing only trims offsets; ids pass unchanged.
class IdentityPostProcessor final : public PostProcessor {
 public:
  void Process(std::vector<int32_t>*) const override {}
};

absl::StatusOr<std::unique_ptr<PostProcessor>> MakeTemplateFromJson(const json& j) {
  const json& single = j.at("single");
  const json& specials = j.contains("special_tokens") ? j["special_tokens"] : json::object();
  std::vector<int32_t> prefix, suffix;
  bool seen_sequence = false;
  for (const json& item : single) {
    if (item.contains("Sequence")) {
      if (item["Sequence"].value("id", "A") != "A") {
        return absl::InvalidArgumentError(
            "TemplateProcessing: single uses a sequence other than A");
      }
      seen_sequence = true;
      continue;
    }
    if (!item.contains("SpecialToken")) {
      return absl::InvalidArgumentError(absl::StrCat("TemplateProcessing: bad item ", item.dump()));
    }
    const std::string name = item["SpecialToken"].at("id").get<std::string>();
    if (!specials.contains(name)) {
      return absl::InvalidArgumentError(
          absl::StrCat("TemplateProcessing: special token \"", name, "\" has no ids"));
    }
    for (const json& id : specials[name].at("ids")) {
      (seen_sequence ? suffix : prefix).push_back(id.get<int32_t>());
    }
  }
  return std::make_unique<TemplatePostProcessor>(std::move(prefix), std::move(suffix));
}

}  // namespace

absl::StatusOr<std::unique_ptr<Decoder>> MakeDecoder(const json& j) {
  if (!j.is_object() || !j.contains("type") || !j["type"].is_string()) {
    return absl::InvalidArgumentError("decoder without a \"type\"");
  }
  const std::string type = j["type"].get<std::string>();
  try {
    if (type == "Sequence") {
      std::vector<std::unique_ptr<Decoder>> parts;
      for (const json& n : j.at("decoders")) {
        ASSIGN_OR_RETURN(auto p, MakeDecoder(n));
        parts.push_back(std::move(p));
      }
      return std::make_unique<SequenceDecoder>(std::move(parts));
    }
    if (type == "ByteLevel") return std::make_unique<ByteLevelDecoder>();
    if (type == "Metaspace") {
      bool prepend = j.value("add_prefix_space", true);
      if (j.contains("prepend_scheme") && j["prepend_scheme"].is_string()) {
        prepend = j["prepend_scheme"].get<std::string>() != "never";
      }
      return std::make_unique<MetaspaceDecoder>(j.value("replacement", "\u2581"), prepend);
    }
    if (type == "Replace") {
      ASSIGN_OR_RETURN(Pattern p, Pattern::FromJson(j.at("pattern"), "Replace decoder"));
      return std::make_unique<ReplaceDecoder>(std::move(p), j.at("content").get<std::string>());
    }
    if (type == "ByteFallback") return std::make_unique<ByteFallbackDecoder>();
    if (type == "Fuse") return std::make_unique<FuseDecoder>();
    if (type == "Strip") {
      return std::make_unique<StripDecoder>(j.at("content").get<std::string>(), j.value("start", 0),
                                            j.value("stop", 0));
    }
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(type, " decoder: ", e.what()));
  }
  return absl::InvalidArgumentError(absl::StrCat("unsupported decoder type \"", type, "\""));
}

absl::StatusOr<std::unique_ptr<PostProcessor>> MakePostProcessor(const json& j) {
  if (!j.is_object() || !j.contains("type") || !j["type"].is_string()) {
    return absl::InvalidArgumentError("post_processor without a \"type\"");
  }
  const std::string type = j["type"].get<std::string>();
  try {
    if (type == "Sequence") {
      std::vector<std::unique_ptr<PostProcessor>> parts;
      for (const json& n : j.at("processors")) {
        ASSIGN_OR_RETURN(auto p, MakePostProcessor(n));
        parts.push_back(std::move(p));
      }
      return std::make_unique<SequencePostProcessor>(std::move(parts));
    }
    if (type == "ByteLevel") return std::make_unique<IdentityPostProcessor>();
    if (type == "TemplateProcessing") return MakeTemplateFromJson(j);
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(type, " post_processor: ", e.what()));
  }
  return absl::InvalidArgumentError(absl::StrCat("unsupported post_processor type \"", type, "\""));
}

std::unique_ptr<PostProcessor> MakeTemplate(std::vector<int32_t> prefix,
                                            std::vector<int32_t> suffix) {
  return std::make_unique<TemplatePostProcessor>(std::move(prefix), std::move(suffix));
}

}  // namespace moemesh::text
