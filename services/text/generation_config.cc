#include "services/text/generation_config.h"

#include <cmath>
#include <cstdint>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"
#include "services/common/status_macros.h"

namespace moemesh {
namespace {

absl::Status Bad(const std::string& source, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(source, ": ", what));
}

// A token id field: a number, a list of numbers, or null.
absl::Status ReadIds(const nlohmann::json& j, const char* key, const std::string& source,
                     std::vector<int32_t>* out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return absl::OkStatus();
  auto one = [&](const nlohmann::json& v) -> absl::Status {
    if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() > INT32_MAX)
      return Bad(source, absl::StrCat("'", key, "' must be a token id or a list of them"));
    out->push_back(v.get<int32_t>());
    return absl::OkStatus();
  };
  if (it->is_array()) {
    for (const auto& v : *it) RETURN_IF_ERROR(one(v));
    return absl::OkStatus();
  }
  return one(*it);
}

absl::StatusOr<std::optional<float>> ReadFloat(const nlohmann::json& j, const char* key,
                                               const std::string& source) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return std::optional<float>();
  if (!it->is_number()) return Bad(source, absl::StrCat("'", key, "' must be a number"));
  return std::optional<float>(it->get<float>());
}

absl::StatusOr<std::optional<std::string>> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return std::optional<std::string>();
  std::stringstream ss;
  ss << in.rdbuf();
  return std::optional<std::string>(ss.str());
}

}  // namespace

absl::StatusOr<GenerationConfig> GenerationConfig::FromJson(std::string_view text,
                                                            const std::string& source) {
  nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return Bad(source, "not a JSON object");
  GenerationConfig g;
  RETURN_IF_ERROR(ReadIds(j, "eos_token_id", source, &g.eos_token_ids));
  std::vector<int32_t> bos;
  RETURN_IF_ERROR(ReadIds(j, "bos_token_id", source, &bos));
  if (!bos.empty()) g.bos_token_id = bos.front();
  ASSIGN_OR_RETURN(g.temperature, ReadFloat(j, "temperature", source));
  ASSIGN_OR_RETURN(g.top_p, ReadFloat(j, "top_p", source));
  if (auto it = j.find("top_k"); it != j.end() && !it->is_null()) {
    if (!it->is_number_integer() || it->get<int64_t>() < 0 || it->get<int64_t>() > INT32_MAX)
      return Bad(source, "'top_k' must be a non-negative integer");
    g.top_k = it->get<int>();
  }
  if (g.temperature && (*g.temperature < 0 || !std::isfinite(*g.temperature)))
    return Bad(source, "'temperature' must be >= 0");
  if (g.top_p && !(*g.top_p > 0 && *g.top_p <= 1)) return Bad(source, "'top_p' must be in (0, 1]");
  return g;
}

absl::StatusOr<GenerationConfig> GenerationConfig::LoadDir(const std::string& dir) {
  const std::string gen_path = dir + "/generation_config.json";
  ASSIGN_OR_RETURN(std::optional<std::string> gen, ReadFile(gen_path));
  GenerationConfig g;
  if (gen) {
    ASSIGN_OR_RETURN(g, FromJson(*gen, gen_path));
  }
  if (g.eos_token_ids.empty() || !g.bos_token_id) {
    const std::string cfg_path = dir + "/config.json";
    ASSIGN_OR_RETURN(std::optional<std::string> cfg, ReadFile(cfg_path));
    if (cfg) {
      nlohmann::json j = nlohmann::json::parse(*cfg, nullptr, /*allow_exceptions=*/false);
      if (j.is_object()) {
        if (g.eos_token_ids.empty())
          RETURN_IF_ERROR(ReadIds(j, "eos_token_id", cfg_path, &g.eos_token_ids));
        if (!g.bos_token_id) {
          std::vector<int32_t> bos;
          RETURN_IF_ERROR(ReadIds(j, "bos_token_id", cfg_path, &bos));
          if (!bos.empty()) g.bos_token_id = bos.front();
        }
      }
    }
  }
  return g;
}

}  // namespace moemesh
