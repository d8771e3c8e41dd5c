// GenerationConfig: a model's generation defaults, as Hugging Face's `generation_config.json`
// states them.
//
// `eos_token_id` may be a number or a list; generation stops at any of them unless a request
// says otherwise. `temperature`, `top_p` and `top_k` are the defaults a request gets when it
// leaves them unset (as vLLM applies them). Without generation_config.json the EOS ids come
// from config.json's `eos_token_id`, as transformers does. Immutable after load.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace moemesh {

struct GenerationConfig {
  std::vector<int32_t> eos_token_ids;
  std::optional<int32_t> bos_token_id;
  std::optional<float> temperature;
  std::optional<float> top_p;
  std::optional<int> top_k;

  // Parses generation_config.json text; `source` names it in errors.
  [[nodiscard]] static absl::StatusOr<GenerationConfig> FromJson(std::string_view text,
                                                                 const std::string& source);
  // DIR/generation_config.json when present, else the EOS/BOS ids of DIR/config.json; an absent
  // file is not an error (the result is empty), a malformed one is.
  [[nodiscard]] static absl::StatusOr<GenerationConfig> LoadDir(const std::string& dir);
};

}  // namespace moemesh
