// moemesh-expert-worker: serves one expert group of a checkpoint over gRPC.
//
//   moemesh-expert-worker --model DIR --experts 0-3 [--port 0 --port_file F]
//   moemesh-expert-worker --model DIR --placement FILE
//   moemesh-expert-worker --model DIR --experts 0-3 --backend cuda --device 1
#include <algorithm>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "expert_worker/worker_service.h"
#include "services/common/status_macros.h"
#include "services/compute/backend.h"
#include "services/compute/cpu/kernel_threads.h"
#include "services/compute/cpu/matmul.h"
#include "services/engine/inproc.h"
#ifdef MOEMESH_HAVE_CUDA
#include "services/compute/cuda/cuda_backend.h"
#endif
#include "services/model/config.h"
#include "services/model/safetensors.h"
#include "services/rpc/server_host.h"
#include "services/rpc/service_main.h"
#include "services/rpc/tls.h"

ABSL_FLAG(std::string, model, "", "checkpoint directory");
ABSL_FLAG(std::string, experts, "",
          "experts held in every MoE layer, e.g. 0-3 (\"shared\" adds shared experts)");
ABSL_FLAG(std::string, placement, "",
          "placement file: lines of 'LAYER IDS' (instead of --experts)");
ABSL_FLAG(std::string, host, "127.0.0.1", "address to listen on");
ABSL_FLAG(int, port, 0, "port (0 picks a free one)");
ABSL_FLAG(std::string, port_file, "", "write the bound port here once serving");
ABSL_FLAG(int, metrics_port, -1, "Prometheus /metrics port (-1: off, 0: pick one)");
ABSL_FLAG(std::string, name, "", "name of this worker (defaults to its expert spec)");
ABSL_FLAG(int, threads, 1,
          "compute threads (each uses the BLAS threads; with --backend cuda at least one per "
          "GPU execution context, 4)");
ABSL_FLAG(int, max_queue, 256, "queued calls before RESOURCE_EXHAUSTED");
ABSL_FLAG(double, max_connection_age, 60,
          "seconds after which a client connection is recycled, so routers resolving the "
          "group's DNS name find replicas added since (0: never)");
ABSL_FLAG(double, drain_seconds, 10, "grace period for in-flight calls on SIGTERM");
ABSL_FLAG(std::string, backend, "cpu",
          "compute backend: cpu | cuda (cuda needs a CUDA build and a GPU)");
ABSL_FLAG(int, device, 0, "CUDA device for --backend cuda");
ABSL_FLAG(int, kernel_threads, 0, "CPU kernel threads (0: one per CPU this process may run on)");
ABSL_FLAG(int64_t, blas_min_rows, 0,
          "products of at least this many rows go to OpenBLAS (faster prefill, but a request's "
          "logits then depend on what it is batched with); 0: never, every kernel is "
          "batch-invariant");
ABSL_FLAG(std::string, weights_dtype, "checkpoint",
          "expert weights in memory: checkpoint (as stored) | f32 | bf16 | f16");
ABSL_FLAG(int, top_k, 0,
          "routed experts per token the router may assign (0: the config's "
          "num_experts_per_tok); more per token is rejected as INVALID_ARGUMENT");
ABSL_FLAG(double, not_serving_grace, 0,
          "seconds between health turning NOT_SERVING on SIGTERM and refusing new calls");

ABSL_FLAG(std::string, tls_cert, "", "PEM certificate: serve TLS (and present it to peers)");
ABSL_FLAG(std::string, tls_key, "", "PEM private key of --tls_cert");
ABSL_FLAG(std::string, tls_ca, "",
          "PEM CA: require client certificates it signed (mTLS) and verify peers against it");

namespace moemesh::expert_worker {
namespace {

struct Options {
  std::string model, experts, placement, host, port_file, name, backend = "cpu";
  int port = 0, metrics_port = -1, threads = 1, max_queue = 256, device = 0, top_k = 0;
  double drain_seconds = 10, not_serving_grace = 0;
  double max_connection_age = 60;
  std::optional<DType> weights_dtype;
  std::optional<TlsConfig> tls;
  int64_t blas_min_rows = 0;
  int kernel_threads = 0;
};

absl::StatusOr<Options> GetOptions() {
  Options o;
  ASSIGN_OR_RETURN(o.tls, LoadTls({absl::GetFlag(FLAGS_tls_cert), absl::GetFlag(FLAGS_tls_key),
                                   absl::GetFlag(FLAGS_tls_ca)}));
  o.model = absl::GetFlag(FLAGS_model);
  o.experts = absl::GetFlag(FLAGS_experts);
  o.placement = absl::GetFlag(FLAGS_placement);
  o.host = absl::GetFlag(FLAGS_host);
  o.port = absl::GetFlag(FLAGS_port);
  o.port_file = absl::GetFlag(FLAGS_port_file);
  o.metrics_port = absl::GetFlag(FLAGS_metrics_port);
  o.name = absl::GetFlag(FLAGS_name);
  o.threads = absl::GetFlag(FLAGS_threads);
  o.max_queue = absl::GetFlag(FLAGS_max_queue);
  o.drain_seconds = absl::GetFlag(FLAGS_drain_seconds);
  o.max_connection_age = absl::GetFlag(FLAGS_max_connection_age);
  if (o.max_connection_age < 0)
    return absl::InvalidArgumentError("--max_connection_age must be >= 0");
  o.backend = absl::GetFlag(FLAGS_backend);
  o.device = absl::GetFlag(FLAGS_device);
  ASSIGN_OR_RETURN(o.weights_dtype, ParseWeightsDType(absl::GetFlag(FLAGS_weights_dtype)));
  o.blas_min_rows = absl::GetFlag(FLAGS_blas_min_rows);
  if (o.blas_min_rows < 0) return absl::InvalidArgumentError("--blas_min_rows must be >= 0");
  o.kernel_threads = absl::GetFlag(FLAGS_kernel_threads);
  if (o.kernel_threads < 0) return absl::InvalidArgumentError("--kernel_threads must be >= 0");
  o.top_k = absl::GetFlag(FLAGS_top_k);
  o.not_serving_grace = absl::GetFlag(FLAGS_not_serving_grace);
  if (o.top_k < 0 || o.not_serving_grace < 0 || o.drain_seconds < 0)
    return absl::InvalidArgumentError("--top_k, --not_serving_grace, --drain_seconds must be >= 0");
  if (o.model.empty()) return absl::InvalidArgumentError("--model is required");
  if (o.experts.empty() == o.placement.empty()) {
    return absl::InvalidArgumentError("give exactly one of --experts and --placement");
  }
  if (o.port < 0 || o.port > 65535) return absl::InvalidArgumentError("--port out of range");
  if (o.threads < 1 || o.max_queue < 1)
    return absl::InvalidArgumentError("--threads and --max_queue must be >= 1");
  if (o.backend != "cpu" && o.backend != "cuda") {
    return absl::InvalidArgumentError(
        absl::StrCat("--backend must be cpu or cuda, got '", o.backend, "'"));
  }
#ifndef MOEMESH_HAVE_CUDA
  if (o.backend == "cuda") {
    return absl::InvalidArgumentError(
        "--backend cuda: this binary was built without CUDA (nvcc was not found)");
  }
#endif
  if (o.device < 0) return absl::InvalidArgumentError("--device must be >= 0");
  if (o.name.empty())
    o.name = o.experts.empty() ? o.placement : absl::StrCat("experts-", o.experts);
  return o;
}

absl::Status Run(const Options& o) {
  cpu::set_blas_min_rows(o.blas_min_rows);  // before any kernel runs
  if (o.kernel_threads > 0) cpu::KernelThreads::SetThreads(o.kernel_threads);
  SetClientTls(o.tls);  // before any channel: every outgoing connection uses it
  ASSIGN_OR_RETURN(ModelConfig cfg, LoadModelConfig(o.model));
  RETURN_IF_ERROR(ApplyTopKOverride(o.top_k, &cfg));
  ASSIGN_OR_RETURN(auto ckpt, OpenModelCheckpoint(o.model, cfg, o.weights_dtype));
  std::vector<ExpertKey> keys;
  if (!o.experts.empty()) {
    ASSIGN_OR_RETURN(keys, ExpertsFromSpec(cfg, o.experts));
  } else {
    ASSIGN_OR_RETURN(keys, ExpertsFromPlacementFile(cfg, o.placement));
  }
  // The CPU backend computes unless the group moves to a GPU below.
  std::unique_ptr<ComputeBackend> backend = MakeCpuBackend();
  std::string device = "cpu";
  ASSIGN_OR_RETURN(auto group, LocalExpertGroup::Load(*ckpt, cfg, keys, backend.get(), o.name));
  int64_t bytes = group->weight_bytes();
  if (o.backend == "cuda") {
#ifdef MOEMESH_HAVE_CUDA
    // Every expert is uploaded now, in its checkpoint dtype; a group that does not fit stops
    // the worker here with the bytes it needs and the bytes free.
    ASSIGN_OR_RETURN(std::unique_ptr<DeviceExperts> dev,
                     MakeCudaExperts(o.device, group->DeviceWeights(), DeviceExpertsOptions{}),
                     "--backend cuda --device ", o.device);
    device = dev->device();
    bytes = dev->weight_bytes();
    std::fprintf(stderr, "expert_worker %s: %s, compute dtype %s, GEMMs %s\n", o.name.c_str(),
                 device.c_str(), dev->compute_dtype().c_str(), dev->gemm().c_str());
    group->AttachDevice(std::move(dev));
#else
    return absl::InvalidArgumentError("--backend cuda: this binary was built without CUDA");
#endif
  }
  WorkerInfo info;
  info.name = o.name;
  info.architecture = cfg.arch == Arch::kMixtral ? "MixtralForCausalLM" : "DeepseekV3ForCausalLM";
  if (!keys.empty()) {
    const ExpertTensorNames n = keys[0].expert == kSharedExpertId
                                    ? SharedExpertNames(cfg, keys[0].layer)
                                    : RoutedExpertNames(cfg, keys[0].layer, keys[0].expert);
    if (auto ti = ckpt->Info(n.gate); ti.ok()) info.weight_dtype = ti->dtype;
    if (o.weights_dtype.has_value()) info.weight_dtype = *o.weights_dtype;
  }
  info.backend = o.backend;
  // A GPU group dropped its host weights; without the checkpoint too, its mapping goes.
  if (group->device() != nullptr) ckpt.reset();
  info.device = device;
  info.num_experts = cfg.num_experts;
  info.max_assignments_per_token = cfg.top_k + (cfg.n_shared_experts > 0 ? 1 : 0);
  Metrics metrics("expert_worker");
  metrics.SetWorkerWeightBytes(bytes, device);
  if (o.metrics_port >= 0) {
    ASSIGN_OR_RETURN(int mport, metrics.Serve(absl::StrCat(o.host, ":", o.metrics_port)));
    std::fprintf(stderr, "expert_worker %s: metrics on %s:%d\n", o.name.c_str(), o.host.c_str(),
                 mport);
  }
  const size_t held = group->experts().size();
  // On a GPU, calls overlap on the device's execution contexts; one compute thread per
  // context lets the router's concurrent calls reach them.
  const int threads =
      o.backend == "cuda" ? std::max(o.threads, DeviceExpertsOptions{}.contexts) : o.threads;
  WorkerService service(std::move(group), info, threads, o.max_queue, &metrics);
  ServerHostOptions so;
  so.address = absl::StrCat(o.host, ":", o.port);
  so.credentials = ServerCredentials(o.tls);
  so.port_file = o.port_file;
  so.max_connection_age = absl::Seconds(o.max_connection_age);
  ASSIGN_OR_RETURN(auto host, ServerHost::Start(so, {&service}));
  std::fprintf(stderr, "expert_worker %s: serving %zu experts (%.1f MiB) on %s, compute on %s\n",
               o.name.c_str(), held, bytes / 1048576.0, host->address().c_str(), device.c_str());
  const int sig = WaitForShutdownSignal();
  std::fprintf(stderr, "expert_worker %s: signal %d, draining\n", o.name.c_str(), sig);
  host->Drain(absl::Seconds(o.drain_seconds), absl::Seconds(o.not_serving_grace));
  return absl::OkStatus();
}

}  // namespace
}  // namespace moemesh::expert_worker

int main(int argc, char** argv) {
  return moemesh::ServiceMain("moemesh-expert-worker", argc, argv,
                              moemesh::expert_worker::GetOptions, moemesh::expert_worker::Run);
}
