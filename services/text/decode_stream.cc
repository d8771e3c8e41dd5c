// DecodeStream and Utf8Stream (declared in tokenizer.h).
#include "services/text/tokenizer.h"
#include "services/text/unicode.h"

namespace moemesh {
namespace {

constexpr std::string_view kReplacement = "\xEF\xBF\xBD";

bool EndsWithReplacement(const std::string& s) {
  return s.size() >= 3 && s.compare(s.size() - 3, 3, kReplacement) == 0;
}

}  // namespace

DecodeStream::DecodeStream(std::shared_ptr<const Tokenizer> tok, bool skip_special_tokens)
    : tok_(std::move(tok)), skip_special_tokens_(skip_special_tokens) {}

std::string DecodeStream::Push(int32_t id) {
  ids_.push_back(id);
  std::string text = tok_->Decode(ids_, skip_special_tokens_);
  if (text.size() <= prefix_text_.size() || EndsWithReplacement(text) ||
      text.compare(0, prefix_text_.size(), prefix_text_) != 0) {
    return "";
  }
  std::string out = text.substr(prefix_text_.size());
  // The ids just emitted become the context of the next window.
  ids_.erase(ids_.begin(), ids_.begin() + static_cast<std::ptrdiff_t>(prefix_));
  prefix_ = ids_.size();
  prefix_text_ = tok_->Decode(ids_, skip_special_tokens_);
  return out;
}

std::string DecodeStream::Flush() {
  std::string out;
  if (prefix_ < ids_.size()) {
    std::string text = tok_->Decode(ids_, skip_special_tokens_);
    if (text.compare(0, prefix_text_.size(), prefix_text_) == 0) {
      out = text.substr(prefix_text_.size());
    }
  }
  ids_.clear();
  prefix_ = 0;
  prefix_text_.clear();
  return out;
}

std::string Utf8Stream::Push(std::string_view bytes) {
  pending_.append(bytes.data(), bytes.size());
  std::string out;
  size_t i = 0;
  while (i < pending_.size()) {
    const int len = text::ValidUtf8SequenceLength(pending_, i);
    if (len > 0) {
      out.append(pending_, i, len);
      i += len;
      continue;
    }
    // Hold back a valid but incomplete sequence at the end; anything else is U+FFFD.
    const auto c = static_cast<uint8_t>(pending_[i]);
    const size_t want = c >= 0xF0 && c <= 0xF4   ? 4
                        : c >= 0xE0 && c <= 0xEF ? 3
                        : c >= 0xC2 && c <= 0xDF ? 2
                                                 : 0;
    if (want > 0 && i + want > pending_.size()) {
      std::string padded = pending_.substr(i);
      // Complete it with the smallest continuation bytes allowed to see if it could be valid.
      while (padded.size() < want) padded.push_back(static_cast<char>(0xBF));
      bool could = text::ValidUtf8SequenceLength(padded, 0) > 0;
      if (!could) {
        padded = pending_.substr(i);
        while (padded.size() < want) padded.push_back(static_cast<char>(0x80));
        could = text::ValidUtf8SequenceLength(padded, 0) > 0;
      }
      if (could) break;
    }
    out += kReplacement;
    ++i;
  }
  pending_.erase(0, i);
  return out;
}

std::string Utf8Stream::Flush() {
  std::string out = pending_.empty() ? "" : std::string(kReplacement);
  pending_.clear();
  return out;
}

}  // namespace moemesh
