#include "expert_worker/worker_service.h"

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "services/rpc/request_validation.h"
#include "services/rpc/tensor_proto.h"
#include "services/rpc/wire_codec.h"

namespace moemesh::expert_worker {

WorkerService::WorkerService(std::unique_ptr<LocalExpertGroup> group, WorkerInfo info, int threads,
                             size_t max_queue, Metrics* metrics)
    : group_(std::move(group)),
      info_(std::move(info)),
      metrics_(metrics),
      pool_(threads, max_queue) {}

grpc::ServerUnaryReactor* WorkerService::RunExperts(grpc::CallbackServerContext* ctx,
                                                    const grpc::ByteBuffer* req,
                                                    grpc::ByteBuffer* resp) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  const absl::Time received = absl::Now();
  auto fail = [&](const absl::Status& s) {
    metrics_->CountRequest("RunExperts", s.code());
    reactor->Finish(ToGrpcStatus(s));
    return reactor;
  };
  ReceivedBytes bytes;
  WireRunExpertsRequest parsed;
  if (absl::Status s = bytes.Reset(*req); !s.ok()) return fail(s);
  if (absl::Status s = ParseRunExpertsRequest(bytes.chunks(), &parsed); !s.ok()) return fail(s);
  // Validate before allocating anything the request's sizes decide.
  if (absl::Status v =
          ValidateRunExperts(parsed.tokens.shape, parsed.offsets, parsed.experts, parsed.weights,
                             group_->hidden(), info_.num_experts, info_.max_assignments_per_token);
      !v.ok()) {
    return fail(v);
  }
  auto batch = std::make_shared<ExpertBatch>();
  batch->layer = parsed.layer;
  auto tokens = TensorFromWire(parsed.tokens, "tokens", 2);
  if (!tokens.ok()) return fail(tokens.status());
  batch->tokens = *std::move(tokens);
  batch->offsets = std::move(parsed.offsets);
  batch->assignments.resize(parsed.experts.size());
  for (size_t i = 0; i < parsed.experts.size(); ++i) {
    batch->assignments[i] = {parsed.experts[i], parsed.weights[i]};
  }
  auto out = ActivationDTypeFromProto(static_cast<v1::DType>(parsed.output_dtype));
  if (!out.ok()) return fail(out.status());
  const DType out_dtype = *out;
  const bool queued = pool_.TrySchedule([this, ctx, reactor, resp, batch, out_dtype, received] {
    if (ctx->IsCancelled()) {
      metrics_->CountRequest("RunExperts", absl::StatusCode::kCancelled);
      reactor->Finish(grpc::Status(grpc::StatusCode::CANCELLED, "cancelled before compute"));
      return;
    }
    if (absl::FromChrono(ctx->deadline()) < absl::Now()) {
      metrics_->CountRequest("RunExperts", absl::StatusCode::kDeadlineExceeded);
      reactor->Finish(
          grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, "deadline passed while queued"));
      return;
    }
    const absl::Time start = absl::Now();
    absl::StatusOr<Tensor> out = group_->Run(*batch);
    const absl::Time end = absl::Now();
    metrics_->ObserveCompute(absl::ToDoubleSeconds(end - start), batch->num_tokens(),
                             static_cast<int64_t>(batch->assignments.size()));
    metrics_->SetExpertWeightBytesRead(group_->counters().weight_bytes_read);
    metrics_->ObserveLatency("RunExperts", absl::ToDoubleSeconds(end - received));
    metrics_->CountRequest("RunExperts", out.status().code());
    if (!out.ok()) {
      reactor->Finish(ToGrpcStatus(out.status()));
      return;
    }
    *resp = EncodeOutputMessage(*out, out_dtype);
    reactor->Finish(grpc::Status::OK);
  });
  if (!queued) {
    return fail(absl::ResourceExhaustedError("expert worker queue is full"));
  }
  metrics_->SetQueueDepth(static_cast<double>(pool_.queued()));
  return reactor;
}

grpc::ServerUnaryReactor* WorkerService::Describe(grpc::CallbackServerContext* ctx,
                                                  const v1::DescribeRequest* req,
                                                  v1::DescribeResponse* resp) {
  for (const ExpertKey& k : group_->experts()) {
    v1::ExpertSlot* s = resp->add_experts();
    s->set_layer(k.layer);
    s->set_expert(k.expert);
  }
  resp->set_architecture(info_.architecture);
  resp->set_hidden_size(static_cast<int32_t>(group_->hidden()));
  resp->set_weight_dtype(DTypeToProto(info_.weight_dtype));
  resp->set_backend(info_.backend);
  resp->set_device(info_.device);
  resp->set_weight_bytes(group_->weight_bytes());
  resp->set_name(info_.name);
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

}  // namespace moemesh::expert_worker
