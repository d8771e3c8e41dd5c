#include "services/metrics/metrics.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <sstream>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "prometheus/text_serializer.h"

namespace moemesh {
namespace {

const prometheus::Histogram::BucketBoundaries& LatencyBuckets() {
  static const auto* b = new prometheus::Histogram::BucketBoundaries{
      0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30};
  return *b;
}

}  // namespace

Metrics::Metrics(std::string service)
    : service_(std::move(service)), registry_(std::make_shared<prometheus::Registry>()) {
  using prometheus::BuildCounter;
  using prometheus::BuildGauge;
  using prometheus::BuildHistogram;
  requests_ = &BuildCounter()
                   .Name("moemesh_requests_total")
                   .Help("RPCs handled, by method and status code")
                   .Register(*registry_);
  latency_ = &BuildHistogram()
                  .Name("moemesh_request_duration_seconds")
                  .Help("RPC handling time")
                  .Register(*registry_);
  queue_depth_ =
      &BuildGauge().Name("moemesh_queue_depth").Help("Work waiting to start").Register(*registry_);
  busy_ratio_ = &BuildGauge()
                     .Name("moemesh_busy_ratio")
                     .Help("Fraction of recent wall time spent computing")
                     .Register(*registry_);
  compute_seconds_ = &BuildCounter()
                          .Name("moemesh_expert_compute_seconds_total")
                          .Help("Time spent in expert FFNs")
                          .Register(*registry_);
  expert_tokens_ = &BuildCounter()
                        .Name("moemesh_expert_tokens_total")
                        .Help("Tokens routed to each expert")
                        .Register(*registry_);
  worker_tokens_ = &BuildCounter()
                        .Name("moemesh_worker_tokens_total")
                        .Help("Token rows computed by an expert worker")
                        .Register(*registry_);
  token_sends_ = &BuildCounter()
                      .Name("moemesh_dispatch_token_sends_total")
                      .Help("(token, group) pairs sent by the router")
                      .Register(*registry_);
  retries_ = &BuildCounter()
                  .Name("moemesh_replica_retries_total")
                  .Help("Calls retried on another replica")
                  .Register(*registry_);
  group_replicas_ = &BuildGauge()
                         .Name("moemesh_group_replicas")
                         .Help("Replicas of each expert group, ready or down")
                         .Register(*registry_);
  tokens_ = &BuildCounter()
                 .Name("moemesh_tokens_total")
                 .Help("Prompt and completion tokens")
                 .Register(*registry_);
  running_ = &BuildGauge()
                  .Name("moemesh_running_sequences")
                  .Help("Sequences in the running batch")
                  .Register(*registry_);
  step_tokens_ = &BuildHistogram()
                      .Name("moemesh_step_tokens")
                      .Help("Tokens per engine step")
                      .Register(*registry_);
  step_seconds_ = &BuildHistogram()
                       .Name("moemesh_step_duration_seconds")
                       .Help("Engine step time")
                       .Register(*registry_);
  gateway_busy_ = &BuildCounter()
                       .Name("moemesh_gateway_busy_seconds_total")
                       .Help("Engine thread time computing in steps (attention, norms, LM head)")
                       .Register(*registry_);
  gateway_moe_wait_ = &BuildCounter()
                           .Name("moemesh_gateway_moe_wait_seconds_total")
                           .Help("Engine thread time in steps waiting for MoE results")
                           .Register(*registry_);
  worker_weight_bytes_ = &BuildGauge()
                              .Name("moemesh_worker_weight_bytes")
                              .Help("Bytes of the expert weights the worker holds, by device")
                              .Register(*registry_);
  weight_bytes_read_ = &BuildCounter()
                            .Name("moemesh_expert_weight_bytes_read_total")
                            .Help(
                                "Bytes of expert weights the worker's calls read (each expert "
                                "once per call)")
                            .Register(*registry_);
  gateway_stage_ = &BuildCounter()
                        .Name("moemesh_gateway_stage_seconds_total")
                        .Help(
                            "Engine thread time computing in steps, by stage (attention, "
                            "moe_call, dense_ffn, lm_head, other)")
                        .Register(*registry_);
  gateway_steps_ = &BuildCounter()
                        .Name("moemesh_gateway_steps_total")
                        .Help(
                            "Engine steps by kind (decode: one token per input; prefill: with "
                            "a prefill chunk) and by the micro-batches they ran in")
                        .Register(*registry_);
  ttft_ = &BuildHistogram()
               .Name("moemesh_time_to_first_token_seconds")
               .Help("Request arrival to first token")
               .Register(*registry_);
  http_requests_ = &BuildCounter()
                        .Name("moemesh_http_requests_total")
                        .Help("HTTP API requests by path and status code")
                        .Register(*registry_);
  http_latency_ = &BuildHistogram()
                       .Name("moemesh_http_request_duration_seconds")
                       .Help("HTTP API request receive to response end (the whole stream)")
                       .Register(*registry_);
  kv_blocks_ = &BuildGauge()
                    .Name("moemesh_kv_cache_blocks")
                    .Help("KV cache blocks: used by sequences, cached for prefix reuse, total")
                    .Register(*registry_);
  kv_usage_ = &BuildGauge()
                   .Name("moemesh_kv_cache_usage_ratio")
                   .Help("Fraction of the KV cache's blocks used by sequences")
                   .Register(*registry_);
  preemptions_ = &BuildCounter()
                      .Name("moemesh_preemptions_total")
                      .Help("Running requests preempted for KV memory, to be recomputed")
                      .Register(*registry_);
  prefix_query_ = &BuildCounter()
                       .Name("moemesh_prefix_cache_query_tokens_total")
                       .Help("Prompt tokens looked up in the prefix cache")
                       .Register(*registry_);
  prefix_hit_ = &BuildCounter()
                     .Name("moemesh_prefix_cache_hit_tokens_total")
                     .Help("Prompt tokens found in the prefix cache")
                     .Register(*registry_);
  prefix_hit_ratio_ = &BuildGauge()
                           .Name("moemesh_prefix_cache_hit_ratio")
                           .Help("Prefix cache hit tokens / query tokens since start")
                           .Register(*registry_);
  window_start_ = absl::Now();
}

Metrics::~Metrics() = default;

namespace {

// A port that is free on `host` right now (bound and released), for servers that cannot
// bind port 0 reliably.
int PickFreePort(const std::string& host) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return 0;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = 0;
  if (::inet_pton(AF_INET, host.c_str(), &addr.sin_addr) != 1)
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  int port = 0;
  socklen_t len = sizeof(addr);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0 &&
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0) {
    port = ntohs(addr.sin_port);
  }
  ::close(fd);
  return port;
}

}  // namespace

absl::StatusOr<int> Metrics::Serve(const std::string& address) {
  // civetweb (under prometheus-cpp) sometimes fails to start on port 0 when several servers
  // start at once; for port 0 pick a free port ourselves and retry if it is taken meanwhile.
  const std::string host = address.substr(0, address.rfind(':'));
  const bool any_port = address.substr(address.rfind(':') + 1) == "0";
  std::string last_error;
  for (int attempt = 0; attempt < (any_port ? 20 : 1); ++attempt) {
    std::string bind = address;
    if (any_port) {
      const int port = PickFreePort(host);
      if (port == 0) continue;
      bind = absl::StrCat(host, ":", port);
    }
    try {
      auto exposer = std::make_unique<prometheus::Exposer>(bind);
      exposer->RegisterCollectable(registry_);
      const auto ports = exposer->GetListeningPorts();
      if (ports.empty()) {
        last_error = "no listening port";
        continue;
      }
      exposer_ = std::move(exposer);
      return ports[0];
    } catch (const std::exception& e) {
      last_error = e.what();
    }
  }
  return absl::UnavailableError(
      absl::StrCat("metrics: cannot listen on ", address, ": ", last_error));
}

std::string Metrics::Render() const {
  prometheus::TextSerializer s;
  return s.Serialize(registry_->Collect());
}

prometheus::Counter& Metrics::Counter(prometheus::Family<prometheus::Counter>* f,
                                      const std::map<std::string, std::string>& labels) {
  return f->Add(labels);
}

void Metrics::CountRequest(const std::string& method, absl::StatusCode code) {
  requests_
      ->Add({{"service", service_}, {"method", method}, {"code", absl::StatusCodeToString(code)}})
      .Increment();
}

void Metrics::ObserveLatency(const std::string& method, double seconds) {
  latency_->Add({{"service", service_}, {"method", method}}, LatencyBuckets()).Observe(seconds);
}

void Metrics::CountHttpRequest(const std::string& path, int status) {
  Counter(http_requests_, {{"path", path}, {"code", std::to_string(status)}}).Increment();
}

void Metrics::ObserveHttpLatency(const std::string& path, double seconds) {
  http_latency_->Add({{"path", path}}, LatencyBuckets()).Observe(seconds);
}

void Metrics::SetQueueDepth(double depth) { queue_depth_->Add({{"service", service_}}).Set(depth); }

void Metrics::ObserveCompute(double seconds, int64_t tokens, int64_t assignments) {
  compute_seconds_->Add({{"service", service_}}).Increment(seconds);
  worker_tokens_->Add({{"service", service_}}).Increment(static_cast<double>(tokens));
  absl::MutexLock lock(&mu_);
  window_busy_ += seconds;
  const double wall = absl::ToDoubleSeconds(absl::Now() - window_start_);
  if (wall >= 5.0) {
    busy_ratio_->Add({{"service", service_}}).Set(std::min(1.0, window_busy_ / wall));
    window_busy_ = 0;
    window_start_ = absl::Now();
  }
}

void Metrics::AddExpertTokens(int layer, const std::vector<int64_t>& per_expert) {
  for (size_t e = 0; e < per_expert.size(); ++e) {
    if (per_expert[e] == 0) continue;
    expert_tokens_->Add({{"layer", absl::StrCat(layer)}, {"expert", absl::StrCat(e)}})
        .Increment(static_cast<double>(per_expert[e]));
  }
}

void Metrics::AddTokenSends(int64_t sends) {
  token_sends_->Add({}).Increment(static_cast<double>(sends));
}

void Metrics::CountRetry(int group) { retries_->Add({{"group", absl::StrCat(group)}}).Increment(); }

void Metrics::SetGroupReplicas(int group, int ready, int total) {
  group_replicas_->Add({{"group", absl::StrCat(group)}, {"state", "ready"}}).Set(ready);
  group_replicas_->Add({{"group", absl::StrCat(group)}, {"state", "down"}}).Set(total - ready);
}

void Metrics::AddTokens(int64_t prompt, int64_t completion) {
  if (prompt) tokens_->Add({{"kind", "prompt"}}).Increment(static_cast<double>(prompt));
  if (completion) tokens_->Add({{"kind", "completion"}}).Increment(static_cast<double>(completion));
}

void Metrics::SetRunning(double running) { running_->Add({}).Set(running); }

void Metrics::ObserveStep(double seconds, int64_t tokens) {
  static const prometheus::Histogram::BucketBoundaries kTokens{1,  2,   4,   8,   16,  32,
                                                               64, 128, 256, 512, 1024};
  step_tokens_->Add({}, kTokens).Observe(static_cast<double>(tokens));
  step_seconds_->Add({}, LatencyBuckets()).Observe(seconds);
}

void Metrics::AddGatewayTime(double busy_seconds, double moe_wait_seconds) {
  gateway_busy_->Add({}).Increment(std::max(0.0, busy_seconds));
  gateway_moe_wait_->Add({}).Increment(std::max(0.0, moe_wait_seconds));
}

void Metrics::SetWorkerWeightBytes(int64_t bytes, const std::string& device) {
  worker_weight_bytes_->Add({{"service", service_}, {"device", device}})
      .Set(static_cast<double>(bytes));
}

void Metrics::SetExpertWeightBytesRead(int64_t total) {
  int64_t prev = weight_bytes_exported_.load();
  while (total > prev && !weight_bytes_exported_.compare_exchange_weak(prev, total)) {
  }
  if (total > prev) {
    weight_bytes_read_->Add({{"service", service_}}).Increment(static_cast<double>(total - prev));
  }
}

void Metrics::AddGatewayStageTime(const std::string& stage, double seconds) {
  gateway_stage_->Add({{"stage", stage}}).Increment(std::max(0.0, seconds));
}

void Metrics::AddSteps(bool decode, int micro_batches, int64_t steps) {
  if (steps <= 0) return;
  gateway_steps_
      ->Add(
          {{"kind", decode ? "decode" : "prefill"}, {"micro_batches", absl::StrCat(micro_batches)}})
      .Increment(static_cast<double>(steps));
}

void Metrics::ObserveTimeToFirstToken(double seconds) {
  ttft_->Add({}, LatencyBuckets()).Observe(seconds);
}

void Metrics::ObserveKvCache(int64_t used_blocks, int64_t cached_blocks, int64_t total_blocks,
                             int64_t preempted, int64_t prefix_query_tokens,
                             int64_t prefix_hit_tokens) {
  kv_blocks_->Add({{"state", "used"}}).Set(static_cast<double>(used_blocks));
  kv_blocks_->Add({{"state", "cached"}}).Set(static_cast<double>(cached_blocks));
  kv_blocks_->Add({{"state", "total"}}).Set(static_cast<double>(total_blocks));
  if (total_blocks > 0) {
    kv_usage_->Add({}).Set(static_cast<double>(used_blocks) / static_cast<double>(total_blocks));
  }
  auto& preemptions = preemptions_->Add({});
  auto& query = prefix_query_->Add({});
  auto& hit = prefix_hit_->Add({});
  preemptions.Increment(static_cast<double>(preempted));
  query.Increment(static_cast<double>(prefix_query_tokens));
  hit.Increment(static_cast<double>(prefix_hit_tokens));
  if (query.Value() > 0) prefix_hit_ratio_->Add({}).Set(hit.Value() / query.Value());
}

}  // namespace moemesh
