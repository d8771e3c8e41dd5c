#include "services/text/stop_strings.h"

#include <algorithm>
#include <utility>

namespace moemesh {

StopStrings::StopStrings(std::vector<std::string> stops) {
  for (std::string& s : stops) {
    if (s.empty()) continue;
    max_len_ = std::max(max_len_, s.size());
    stops_.push_back(std::move(s));
  }
}

std::string StopStrings::Push(std::string_view piece) {
  if (stopped_) return "";
  held_.append(piece);
  if (stops_.empty()) return std::exchange(held_, std::string());
  // The earliest occurrence of any stop string; among those starting at the same place, the
  // longest is reported (the text is cut at the same place either way).
  size_t cut = std::string::npos;
  for (const std::string& s : stops_) {
    const size_t at = held_.find(s);
    if (at == std::string::npos) continue;
    if (at < cut || (at == cut && s.size() > matched_.size())) {
      cut = at;
      matched_ = s;
    }
  }
  if (cut != std::string::npos) {
    stopped_ = true;
    std::string out = held_.substr(0, cut);
    held_.clear();
    return out;
  }
  // Hold back the longest suffix that is a proper prefix of some stop string. Such a suffix
  // starts on a character boundary: a stop string never starts with a continuation byte.
  size_t keep = 0;
  const size_t longest = std::min(held_.size(), max_len_ - 1);
  for (size_t n = longest; n > 0 && keep == 0; --n) {
    const std::string_view tail = std::string_view(held_).substr(held_.size() - n);
    for (const std::string& s : stops_) {
      if (s.size() > n && std::string_view(s).substr(0, n) == tail) {
        keep = n;
        break;
      }
    }
  }
  std::string out = held_.substr(0, held_.size() - keep);
  held_.erase(0, held_.size() - keep);
  return out;
}

std::string StopStrings::Flush() {
  if (stopped_) return "";
  return std::exchange(held_, std::string());
}

}  // namespace moemesh
