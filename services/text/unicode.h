// Unicode helpers for the tokenizer pipeline: UTF-8 walking, lossy UTF-8 repair, Unicode
// normalization (ICU) and the character classes Hugging Face `tokenizers` tests with Rust's
// `char` methods.
//
// Every function is pure and thread-safe. Strings are UTF-8; functions that take text assume
// valid UTF-8 unless they say otherwise (Tokenizer::Encode checks it at the door).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace moemesh::text {

// Length in bytes of the valid UTF-8 sequence at s[i], or 0 when none starts there.
int ValidUtf8SequenceLength(std::string_view s, size_t i);
bool IsValidUtf8(std::string_view s);

// Decodes the code point at s[*i] (valid UTF-8 assumed) and advances *i past it.
char32_t NextCodePoint(std::string_view s, size_t* i);
void AppendUtf8(char32_t cp, std::string* out);

// Bytes to text as Rust's String::from_utf8_lossy and the WHATWG TextDecoder do it: each
// maximal ill-formed subsequence becomes one U+FFFD.
std::string Utf8Lossy(std::string_view bytes);

enum class NormalForm { kNfc, kNfd, kNfkc, kNfkd };
absl::StatusOr<std::string> Normalize(std::string_view s, NormalForm form);

// Rust char::is_numeric (general categories Nd, Nl, No).
bool IsNumeric(char32_t cp);
// Rust regex \w (Unicode word characters: alphabetic, marks, decimal digits, connector
// punctuation, join controls).
bool IsWordChar(char32_t cp);
// Rust regex \s / char::is_whitespace (the White_Space property).
bool IsWhitespace(char32_t cp);

}  // namespace moemesh::text
