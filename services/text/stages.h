// The stages of a Hugging Face `tokenizer.json` pipeline, one small type per JSON `type`.
//
//   text ─► normalizer ─► pre-tokenizer ─► model (BPE, bpe.h) ─► post-processor ─► ids
//   ids ─► tokens ─► decoder ─► text
//
// Each Make* function reads one JSON object and returns the stage, or INVALID_ARGUMENT that
// names the unsupported `type` (never a silent fallback). Stages are immutable after they
// are built and safe to call from any number of threads.
//
// Text travelling between stages is UTF-8 without offsets: moemesh needs ids, not alignments.
// Where Hugging Face consults an original offset (Metaspace's prepend_scheme "first"), the
// piece carries that fact as `at_start`.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace moemesh::text {

class Normalizer {
 public:
  virtual ~Normalizer() = default;
  [[nodiscard]] virtual absl::Status Normalize(std::string* s) const = 0;
};

// One pre-token: a piece of normalized text, and whether it begins the original input.
struct Piece {
  std::string text;
  bool at_start = false;
};

class PreTokenizer {
 public:
  virtual ~PreTokenizer() = default;
  // Replaces `pieces` by their splits; empty pieces are dropped as Hugging Face drops them.
  [[nodiscard]] virtual absl::Status PreTokenize(std::vector<Piece>* pieces) const = 0;
};

// Post-processing for a single sequence with add_special_tokens=true.
class PostProcessor {
 public:
  virtual ~PostProcessor() = default;
  virtual void Process(std::vector<int32_t>* ids) const = 0;
};

// A decoder turns token strings into text pieces (Hugging Face's decode_chain); the
// tokenizer joins what the last stage returns.
class Decoder {
 public:
  virtual ~Decoder() = default;
  virtual void DecodeChain(std::vector<std::string>* tokens) const = 0;
};

[[nodiscard]] absl::StatusOr<std::unique_ptr<Normalizer>> MakeNormalizer(const nlohmann::json& j);
[[nodiscard]] absl::StatusOr<std::unique_ptr<PreTokenizer>> MakePreTokenizer(
    const nlohmann::json& j);
// TemplateProcessing takes its special tokens' ids from its own "special_tokens" map.
[[nodiscard]] absl::StatusOr<std::unique_ptr<PostProcessor>> MakePostProcessor(
    const nlohmann::json& j);
[[nodiscard]] absl::StatusOr<std::unique_ptr<Decoder>> MakeDecoder(const nlohmann::json& j);

// A TemplateProcessing for one sequence: `prefix` ids, the sequence, `suffix` ids.
std::unique_ptr<PostProcessor> MakeTemplate(std::vector<int32_t> prefix,
                                            std::vector<int32_t> suffix);

// GPT-2's byte-level alphabet: every byte as a printable code point, UTF-8 encoded.
const std::string& ByteLevelSymbol(uint8_t b);
// The byte that a byte-level code point stands for, or -1.
int ByteLevelByte(char32_t cp);

}  // namespace moemesh::text
