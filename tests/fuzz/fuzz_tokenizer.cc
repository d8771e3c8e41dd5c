// Fuzzes tokenizer.json loading and then encoding and decoding with what loaded: any bytes give a
// tokenizer or a Status, and a tokenizer that loads encodes any text to ids it can decode,
// nothing else (no crash, no sanitizer report, no hang).
//
// Input: tokenizer.json, optionally followed by a NUL byte and the text to encode (otherwise a
// fixed text with digits, CJK, an emoji and spaces is encoded).
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "services/text/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view in(reinterpret_cast<const char*>(data), size);
  const size_t nul = in.find('\0');
  const std::string_view json = in.substr(0, nul);
  const std::string_view text =
      nul == std::string_view::npos
          ? std::string_view("Hello, world! 123 45678 你好世界 🙂  a\tb\n")
          : in.substr(nul + 1);
  moemesh::TokenizerOptions o;
  o.max_input_bytes = 1 << 16;
  auto tok = moemesh::Tokenizer::FromJson(json, "", "fuzz/tokenizer.json", o);
  if (!tok.ok()) return 0;
  for (bool special : {true, false}) {
    auto ids = (*tok)->Encode(text, special);
    if (!ids.ok()) continue;
    (void)(*tok)->Decode(*ids, false);
    (void)(*tok)->Decode(*ids, true);
  }
  return 0;
}
