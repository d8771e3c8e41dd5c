#include "gateway/api_keys.h"

#include <fstream>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace moemesh::gateway {
namespace {

// Compares in time that depends only on the lengths.
bool ConstantTimeEquals(absl::string_view a, absl::string_view b) {
  if (a.size() != b.size()) return false;
  unsigned char diff = 0;
  for (size_t i = 0; i < a.size(); ++i)
    diff |= static_cast<unsigned char>(a[i]) ^ static_cast<unsigned char>(b[i]);
  return diff == 0;
}

absl::Status ReadKeys(const std::string& path, std::vector<std::string>* keys) {
  std::ifstream in(path);
  if (!in) return absl::InvalidArgumentError(absl::StrCat("cannot read the API key file ", path));
  std::string line;
  while (std::getline(in, line)) {
    absl::string_view k = absl::StripAsciiWhitespace(line);
    if (k.empty() || k[0] == '#') continue;
    keys->emplace_back(k);
  }
  if (keys->empty())
    return absl::InvalidArgumentError(absl::StrCat("the API key file ", path, " has no key"));
  return absl::OkStatus();
}

}  // namespace

absl::Status ApiKeys::Load(const std::string& path) {
  std::vector<std::string> keys;
  if (absl::Status s = ReadKeys(path, &keys); !s.ok()) return s;
  absl::MutexLock lock(&mu_);
  path_ = path;
  keys_ = std::move(keys);
  enabled_ = true;
  return absl::OkStatus();
}

absl::Status ApiKeys::Reload() {
  std::string path;
  {
    absl::MutexLock lock(&mu_);
    if (!enabled_) return absl::OkStatus();
    path = path_;
  }
  std::vector<std::string> keys;
  if (absl::Status s = ReadKeys(path, &keys); !s.ok()) return s;
  absl::MutexLock lock(&mu_);
  keys_ = std::move(keys);
  return absl::OkStatus();
}

bool ApiKeys::enabled() const {
  absl::MutexLock lock(&mu_);
  return enabled_;
}

bool ApiKeys::Check(absl::string_view authorization) const {
  absl::MutexLock lock(&mu_);
  if (!enabled_) return true;
  constexpr absl::string_view kBearer = "Bearer ";
  if (!absl::StartsWithIgnoreCase(authorization, kBearer)) return false;
  const absl::string_view presented =
      absl::StripAsciiWhitespace(authorization.substr(kBearer.size()));
  bool ok = false;
  for (const std::string& k : keys_) ok |= ConstantTimeEquals(presented, k);
  return ok;
}

}  // namespace moemesh::gateway
