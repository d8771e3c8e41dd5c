// Pieces every moemesh service binary shares.
#pragma once

#include <cstdio>
#include <memory>
#include <string>

#include "absl/flags/parse.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "grpcpp/grpcpp.h"
#include "services/moe/expert_group.h"
#include "services/rpc/server_host.h"

namespace moemesh {

// A unary reactor whose client cancellation (or passed deadline) sets a CancelFlag that the
// work it started watches. Deletes itself when done; call Finish exactly once.
class CancellableUnaryReactor final : public grpc::ServerUnaryReactor {
 public:
  CancellableUnaryReactor() : cancel_(std::make_shared<CancelFlag>()) {}
  void OnCancel() override { cancel_->Cancel(); }
  void OnDone() override { delete this; }
  const std::shared_ptr<CancelFlag>& cancel() const { return cancel_; }

 private:
  std::shared_ptr<CancelFlag> cancel_;
};

// --shared_experts: true for "gateway", false for "mesh", INVALID_ARGUMENT otherwise.
inline absl::StatusOr<bool> ParseSharedExpertsInGateway(absl::string_view flag) {
  if (flag == "gateway") return true;
  if (flag == "mesh") return false;
  return absl::InvalidArgumentError("--shared_experts must be mesh or gateway");
}

// The body of a service's main(): installs the shutdown-signal handler, parses flags, builds
// the options (exit 2 with the message when they are invalid) and runs (exit 1 on error).
template <typename GetOptionsFn, typename RunFn>
int ServiceMain(const char* program, int argc, char** argv, GetOptionsFn get_options, RunFn run) {
  // Debian builds Abseil without NDEBUG, which leaves absl::Mutex's deadlock detection on: every
  // lock and unlock in gRPC (which locks absl::Mutex) updated a process-wide lock graph under
  // its own global mutex. Release builds of Abseil have it off.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  BlockShutdownSignals();
  absl::ParseCommandLine(argc, argv);
  auto options = get_options();
  if (!options.ok()) {
    std::fprintf(stderr, "%s: %s\n", program, std::string(options.status().message()).c_str());
    return 2;
  }
  if (absl::Status s = run(*options); !s.ok()) {
    std::fprintf(stderr, "%s: %s\n", program, std::string(s.message()).c_str());
    return 1;
  }
  return 0;
}

}  // namespace moemesh
