// Client side of `moemesh generate/score --gateway` and `moemesh up`.
#include "tools/cli/commands.h"

namespace moemesh::cli {

absl::Status GenerateViaGateway(const Common& c, const GenerateArgs& a) {
  return absl::UnimplementedError("--gateway is not available yet");
}
absl::Status ScoreViaGateway(const Common& c, const std::vector<int32_t>& tokens, bool logprobs) {
  return absl::UnimplementedError("--gateway is not available yet");
}
absl::Status Up(const Common& c, const UpArgs& a) {
  return absl::UnimplementedError("up is not available yet");
}

}  // namespace moemesh::cli
