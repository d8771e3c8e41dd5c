// Metrics: every Prometheus metric moemesh exports, defined in this one place.
//
// Names follow Prometheus conventions: `moemesh_` prefix, base units (`_seconds`, `_bytes`),
// `_total` for counters, and no per-request labels (labels are bounded: service, method,
// code, layer, expert, group). Where each is measured:
//
//   moemesh_requests_total{service,method,code}        every RPC handler, at Finish
//   moemesh_request_duration_seconds{service,method}   handler receive → Finish
//   moemesh_queue_depth{service}                       worker pool queue / gateway waiting
//   moemesh_busy_ratio{service}                        worker: compute time / wall time
//   moemesh_expert_compute_seconds_total               worker: time inside expert FFNs
//   moemesh_expert_tokens_total{layer,expert}          router: tokens routed to each expert
//   moemesh_worker_tokens_total{service}               worker: token rows computed
//   moemesh_worker_weight_bytes{service,device}        worker: bytes of the expert weights it
//                                                      holds, in their dtype, and where ("cpu"
//                                                      or the GPU's name)
//   moemesh_expert_weight_bytes_read_total{service}    worker: bytes of expert weights its
//                                                      calls read (each expert once per call;
//                                                      over compute seconds: the achieved
//                                                      weight bandwidth)
//   moemesh_dispatch_token_sends_total                 router: (token, group) sends
//   moemesh_replica_retries_total{group}               router: retries on another replica
//   moemesh_group_replicas{group,state=ready|down}     router: replicas per group (degraded
//                                                      while any is down)
//   moemesh_tokens_total{kind=prompt|completion}       gateway: tokens in and out
//   moemesh_running_sequences                          gateway: sequences in the batch
//   moemesh_step_tokens / moemesh_step_duration_seconds gateway: batch size and step time
//   moemesh_gateway_busy_seconds_total                 gateway: engine thread computing in
//                                                      steps (attention, norms, LM head, ...)
//   moemesh_gateway_moe_wait_seconds_total             gateway: engine thread idle in steps,
//                                                      waiting for MoE results
//   moemesh_gateway_stage_seconds_total{stage=         gateway: the busy time above by stage
//     attention|moe_call|dense_ffn|lm_head|other}      (StepProfile in engine.h)
//   moemesh_gateway_steps_total{kind=decode|prefill,   gateway: engine steps by kind (decode:
//                               micro_batches}         one token per input) and by the
//                                                      micro-batches they ran in (the adaptive
//                                                      policy's choices)
//   moemesh_time_to_first_token_seconds                gateway
//   moemesh_http_requests_total{path,code}             gateway HTTP API, when the response ends
//   moemesh_http_request_duration_seconds{path}        gateway HTTP API: receive → response end
//   moemesh_kv_cache_blocks{state=used|cached|total}   gateway: KV cache pool after each step
//                                                      (cached: unreferenced prefix blocks,
//                                                      free to take)
//   moemesh_kv_cache_usage_ratio                       gateway: used / total blocks
//   moemesh_preemptions_total                          gateway: requests sent back to wait for
//                                                      KV memory (recomputed later)
//   moemesh_prefix_cache_query_tokens_total            gateway: prompt tokens looked up in the
//   moemesh_prefix_cache_hit_tokens_total              prefix cache at admission, and found;
//   moemesh_prefix_cache_hit_ratio                     hits / queries since start
//
// Thread-safe. Serve() starts an HTTP /metrics endpoint.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "prometheus/counter.h"
#include "prometheus/exposer.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace moemesh {

class Metrics {
 public:
  // `service`: "gateway", "router" or "expert_worker".
  explicit Metrics(std::string service);
  ~Metrics();

  // Starts /metrics on `address` ("127.0.0.1:0" picks a port); returns the port.
  [[nodiscard]] absl::StatusOr<int> Serve(const std::string& address);
  // The text exposition of every metric (for tests and debugging).
  std::string Render() const;

  void CountRequest(const std::string& method, absl::StatusCode code);
  void ObserveLatency(const std::string& method, double seconds);
  void SetQueueDepth(double depth);

  // Expert worker.
  void ObserveCompute(double seconds, int64_t tokens, int64_t assignments);
  // The worker's expert groups have read `total` bytes of weights since start (a running
  // total, as LocalExpertGroup::counters gives it; calls from several threads may arrive out
  // of order, and only the growth is added).
  void SetExpertWeightBytesRead(int64_t total);
  // The bytes of expert weights this worker holds and the device they are on.
  void SetWorkerWeightBytes(int64_t bytes, const std::string& device);

  // Router.
  void AddExpertTokens(int layer, const std::vector<int64_t>& per_expert);
  void AddTokenSends(int64_t sends);
  void CountRetry(int group);
  void SetGroupReplicas(int group, int ready, int total);

  // Gateway.
  void AddTokens(int64_t prompt, int64_t completion);
  void SetRunning(double running);
  void ObserveStep(double seconds, int64_t tokens);
  // Engine thread time in steps since the last call: computing, and waiting on MoE calls.
  void AddGatewayTime(double busy_seconds, double moe_wait_seconds);
  // The busy time since the last call in one stage of a step (attention, moe_call, dense_ffn,
  // lm_head, other).
  void AddGatewayStageTime(const std::string& stage, double seconds);
  // `steps` more engine steps of this kind that ran in `micro_batches` parts.
  void AddSteps(bool decode, int micro_batches, int64_t steps);
  void ObserveTimeToFirstToken(double seconds);
  // Gateway HTTP API. `path` is one of the API's routes or "other".
  void CountHttpRequest(const std::string& path, int status);
  void ObserveHttpLatency(const std::string& path, double seconds);
  // After each step: the pool's blocks, requests preempted and prefix lookups since the last.
  void ObserveKvCache(int64_t used_blocks, int64_t cached_blocks, int64_t total_blocks,
                      int64_t preempted, int64_t prefix_query_tokens, int64_t prefix_hit_tokens);

 private:
  prometheus::Counter& Counter(prometheus::Family<prometheus::Counter>* f,
                               const std::map<std::string, std::string>& labels);

  const std::string service_;
  std::shared_ptr<prometheus::Registry> registry_;
  std::unique_ptr<prometheus::Exposer> exposer_;
  prometheus::Family<prometheus::Counter>* requests_;
  prometheus::Family<prometheus::Histogram>* latency_;
  prometheus::Family<prometheus::Gauge>* queue_depth_;
  prometheus::Family<prometheus::Gauge>* busy_ratio_;
  prometheus::Family<prometheus::Counter>* compute_seconds_;
  prometheus::Family<prometheus::Counter>* expert_tokens_;
  prometheus::Family<prometheus::Counter>* worker_tokens_;
  prometheus::Family<prometheus::Counter>* token_sends_;
  prometheus::Family<prometheus::Counter>* retries_;
  prometheus::Family<prometheus::Gauge>* group_replicas_;
  prometheus::Family<prometheus::Counter>* tokens_;
  prometheus::Family<prometheus::Gauge>* running_;
  prometheus::Family<prometheus::Histogram>* step_tokens_;
  prometheus::Family<prometheus::Histogram>* step_seconds_;
  prometheus::Family<prometheus::Counter>* gateway_busy_;
  prometheus::Family<prometheus::Counter>* gateway_moe_wait_;
  prometheus::Family<prometheus::Counter>* gateway_stage_;
  prometheus::Family<prometheus::Counter>* weight_bytes_read_;
  prometheus::Family<prometheus::Gauge>* worker_weight_bytes_;
  std::atomic<int64_t> weight_bytes_exported_{0};
  prometheus::Family<prometheus::Counter>* gateway_steps_;
  prometheus::Family<prometheus::Histogram>* ttft_;
  prometheus::Family<prometheus::Counter>* http_requests_;
  prometheus::Family<prometheus::Histogram>* http_latency_;
  prometheus::Family<prometheus::Gauge>* kv_blocks_;
  prometheus::Family<prometheus::Gauge>* kv_usage_;
  prometheus::Family<prometheus::Counter>* preemptions_;
  prometheus::Family<prometheus::Counter>* prefix_query_;
  prometheus::Family<prometheus::Counter>* prefix_hit_;
  prometheus::Family<prometheus::Gauge>* prefix_hit_ratio_;

  absl::Mutex mu_;  // guards the busy-ratio window
  absl::Time window_start_ ABSL_GUARDED_BY(mu_);
  double window_busy_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace moemesh
