// The ExpertWorker gRPC service: RunExperts and Describe over a LocalExpertGroup.
//
// Handlers parse on the gRPC thread and hand the compute to a ThreadPool, so no gRPC thread
// blocks; a full queue answers RESOURCE_EXHAUSTED. Requests are validated before anything is
// allocated for them (ValidateRunExpertsRequest): the work a request can cause is bounded by
// its token count times the experts a token may visit. Calls whose deadline has passed or whose
// client cancelled are dropped before compute. Thread-safe.
#pragma once

#include <atomic>
#include <memory>
#include <string>

#include "moemesh/v1/expert_worker.grpc.pb.h"
#include "services/common/thread_pool.h"
#include "services/metrics/metrics.h"
#include "services/moe/local_expert_group.h"

namespace moemesh::expert_worker {

struct WorkerInfo {
  std::string name;
  std::string architecture;
  DType weight_dtype = DType::kF32;
  std::string backend = "cpu";
  std::string device = "cpu";
  // Experts one token may be assigned: the model's routed top-k plus its shared experts
  // entry (at most one, id -1). More, or the same expert twice, is INVALID_ARGUMENT.
  int max_assignments_per_token = 8;
  int num_experts = 0;  // routed experts per layer (ids 0 .. num_experts-1)
};

// RunExperts is a raw method: its messages are read and written by services/rpc/wire_codec.h,
// straight between gRPC's buffers and tensors (the bytes are still a v1::RunExpertsRequest and
// v1::RunExpertsResponse).
class WorkerService final
    : public v1::ExpertWorker::WithRawCallbackMethod_RunExperts<v1::ExpertWorker::CallbackService> {
 public:
  WorkerService(std::unique_ptr<LocalExpertGroup> group, WorkerInfo info, int threads,
                size_t max_queue, Metrics* metrics);

  grpc::ServerUnaryReactor* RunExperts(grpc::CallbackServerContext* ctx,
                                       const grpc::ByteBuffer* req,
                                       grpc::ByteBuffer* resp) override;
  grpc::ServerUnaryReactor* Describe(grpc::CallbackServerContext* ctx,
                                     const v1::DescribeRequest* req,
                                     v1::DescribeResponse* resp) override;

 private:
  std::unique_ptr<LocalExpertGroup> group_;
  WorkerInfo info_;
  Metrics* metrics_;
  ThreadPool pool_;
};

}  // namespace moemesh::expert_worker
