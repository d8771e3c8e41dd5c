// ApiKeys: the keys a gateway accepts, read from a file (one key per line; blank lines and
// lines starting with '#' are ignored) and reread on demand (SIGHUP).
//
// Check() compares the presented key with every configured key in constant time for keys of
// the same length, and always looks at all of them, so timing tells nothing about which key
// or how much of it matched. Keys are never logged. With no file configured every request is
// allowed. Thread-safe.
#pragma once

#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"

namespace moemesh::gateway {

class ApiKeys {
 public:
  ApiKeys() = default;
  // Reads `path`. An unreadable file or one with no key is an error (a server that means to
  // require keys must not silently accept everyone).
  [[nodiscard]] absl::Status Load(const std::string& path);
  // Rereads the file given to Load; on error the previous keys stay.
  [[nodiscard]] absl::Status Reload();
  bool enabled() const;
  // True when keys are disabled, or `authorization` is "Bearer KEY" for a configured KEY.
  bool Check(absl::string_view authorization) const;

 private:
  mutable absl::Mutex mu_;
  std::string path_ ABSL_GUARDED_BY(mu_);
  std::vector<std::string> keys_ ABSL_GUARDED_BY(mu_);
  bool enabled_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace moemesh::gateway
