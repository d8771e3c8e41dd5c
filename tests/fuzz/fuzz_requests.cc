// Fuzzes the request validators that stand before allocation: RunExperts (worker) and the
// tensors and dtypes of Forward (router). The first input byte picks the limits.
#include <cstddef>
#include <cstdint>

#include "moemesh/v1/expert_worker.pb.h"
#include "moemesh/v1/router.pb.h"
#include "services/rpc/request_validation.h"
#include "services/rpc/tensor_proto.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const int hidden = 1 + (data[0] & 15);
  const int num_experts = 1 + ((data[0] >> 4) & 7);
  const int max_per_token = 1 + (data[0] >> 7) * 2;
  ++data;
  --size;
  moemesh::v1::RunExpertsRequest run;
  if (run.ParseFromArray(data, static_cast<int>(size))) {
    absl::Status s = moemesh::ValidateRunExpertsRequest(run, hidden, num_experts, max_per_token);
    if (s.ok()) {
      // What the validator promises, checked independently.
      const int64_t n = run.tokens().shape(0);
      if (run.offsets_size() != n + 1 || run.offsets(n) != run.experts_size()) __builtin_trap();
      for (int64_t i = 0; i < n; ++i) {
        if (run.offsets(i + 1) - run.offsets(i) > max_per_token) __builtin_trap();
      }
      (void)moemesh::TensorFromProto(run.tokens(), "tokens", 2);
    }
  }
  moemesh::v1::ForwardRequest fwd;
  if (fwd.ParseFromArray(data, static_cast<int>(size))) {
    (void)moemesh::TensorFromProto(fwd.hidden(), "hidden", 2);
    (void)moemesh::ActivationDTypeFromProto(fwd.output_dtype());
  }
  return 0;
}
