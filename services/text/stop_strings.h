// StopStrings: finds stop strings in text that arrives piece by piece.
//
// Generated text reaches the client in pieces (one token's text at a time), and a stop string
// may span several of them. Push returns only text that can no longer become part of a stop
// string: a trailing piece that is a prefix of some stop string is held back until the next
// piece decides it. Once a stop string is found, Push returns the text before its first
// occurrence and stopped() is true; the stop string itself and anything after it are never
// returned. So the streamed text never shows a partial stop string, and the concatenation of
// all returned text equals the full text cut before the first occurrence of any stop string.
// Input pieces must be whole UTF-8 characters; output pieces then are too. Not thread-safe;
// one per stream.
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace moemesh {

class StopStrings {
 public:
  // Empty strings in `stops` are ignored.
  explicit StopStrings(std::vector<std::string> stops);

  // Appends `piece`; returns the text now safe to show. Returns "" once stopped().
  std::string Push(std::string_view piece);
  // The end of the stream: returns whatever is still held back (no stop string was found).
  std::string Flush();
  bool stopped() const { return stopped_; }
  // The stop string that ended the text, when stopped().
  const std::string& matched() const { return matched_; }
  bool empty() const { return stops_.empty(); }

 private:
  std::vector<std::string> stops_;
  size_t max_len_ = 0;
  std::string held_;  // text not yet returned; never longer than max_len_ - 1 between calls
  bool stopped_ = false;
  std::string matched_;
};

}  // namespace moemesh
