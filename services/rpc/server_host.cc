#include "services/rpc/server_host.h"

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <fstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/health_check_service_interface.h"
#include "services/rpc/tls.h"

namespace moemesh {

absl::StatusOr<std::unique_ptr<ServerHost>> ServerHost::Start(
    const ServerHostOptions& options, const std::vector<grpc::Service*>& services) {
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  std::unique_ptr<ServerHost> host(new ServerHost());
  grpc::ServerBuilder builder;
  builder.SetMaxReceiveMessageSize(options.max_receive_message_bytes);
  builder.SetMaxSendMessageSize(options.max_send_message_bytes);
  // Keepalive: ping clients, and accept their pings (every 10 s, also with no call in
  // flight) without answering GOAWAY "too_many_pings".
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS,
                             static_cast<int>(absl::ToInt64Milliseconds(options.keepalive_time)));
  builder.AddChannelArgument(
      GRPC_ARG_KEEPALIVE_TIMEOUT_MS,
      static_cast<int>(absl::ToInt64Milliseconds(options.keepalive_timeout)));
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 5000);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MAX_PING_STRIKES, 0);
  if (options.max_connection_age > absl::ZeroDuration()) {
    builder.AddChannelArgument(
        GRPC_ARG_MAX_CONNECTION_AGE_MS,
        static_cast<int>(absl::ToInt64Milliseconds(options.max_connection_age)));
    builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_AGE_GRACE_MS, 60 * 1000);
  }
  int port = 0;
  builder.AddListeningPort(
      options.address,
      options.credentials ? options.credentials : grpc::InsecureServerCredentials(), &port);
  for (grpc::Service* s : services) builder.RegisterService(s);
  host->server_ = builder.BuildAndStart();
  if (host->server_ == nullptr || port == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", options.address));
  }
  host->port_ = port;
  host->host_ = options.address.substr(0, options.address.rfind(':'));
  host->SetServing(true);
  if (!options.port_file.empty()) {
    const std::string tmp = options.port_file + ".tmp";
    {
      std::ofstream out(tmp);
      out << port << "\n";
      if (!out) return absl::InternalError(absl::StrCat("cannot write ", tmp));
    }
    if (std::rename(tmp.c_str(), options.port_file.c_str()) != 0) {
      return absl::InternalError(absl::StrCat("cannot write ", options.port_file));
    }
  }
  return host;
}

ServerHost::~ServerHost() {
  if (!drained_) Drain(absl::Seconds(1));
}

std::string ServerHost::address() const { return absl::StrCat(host_, ":", port_); }

void ServerHost::SetServing(bool serving) {
  if (auto* h = server_->GetHealthCheckService()) h->SetServingStatus(serving);
}

void ServerHost::SetServiceServing(const std::string& service, bool serving) {
  if (auto* h = server_->GetHealthCheckService()) h->SetServingStatus(service, serving);
}

void ServerHost::Drain(absl::Duration grace, absl::Duration not_serving_grace) {
  if (drained_) return;
  drained_ = true;
  SetServing(false);
  if (not_serving_grace > absl::ZeroDuration()) absl::SleepFor(not_serving_grace);
  server_->Shutdown(absl::ToChronoTime(absl::Now() + grace));
  server_->Wait();
}

namespace {

int g_signal_pipe[2] = {-1, -1};

void OnShutdownSignal(int sig) {
  const char c = static_cast<char>(sig);
  [[maybe_unused]] ssize_t n = ::write(g_signal_pipe[1], &c, 1);
}

}  // namespace

// A handler (not a blocked mask) because libraries such as OpenBLAS start threads before
// main runs; a process-directed signal may land on any of them.
void BlockShutdownSignals() {
  if (g_signal_pipe[0] >= 0) return;
  if (::pipe2(g_signal_pipe, O_CLOEXEC) != 0) return;
  struct sigaction sa = {};
  sa.sa_handler = OnShutdownSignal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  ::sigaction(SIGTERM, &sa, nullptr);
  ::sigaction(SIGINT, &sa, nullptr);
  signal(SIGPIPE, SIG_IGN);
}

int ShutdownSignalFd() { return g_signal_pipe[0]; }

int WaitForShutdownSignal() {
  char c = 0;
  while (::read(g_signal_pipe[0], &c, 1) < 0 && errno == EINTR) {
  }
  return c;
}

grpc::ChannelArguments DefaultChannelArguments(int max_message_bytes) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(max_message_bytes);
  args.SetMaxSendMessageSize(max_message_bytes);
  // Reconnect quickly after a peer restarts (the default backoff reaches minutes).
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 2000);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 100);
  // Keepalive: a frozen or vanished peer fails its calls with UNAVAILABLE within ~15 s
  // instead of holding them until the TCP stack gives up (minutes to hours).
  args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, 10000);
  args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 5000);
  args.SetInt(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  args.SetInt(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
  return args;
}

std::string ChannelServiceConfig(const ChannelOptions& o) {
  std::vector<std::string> parts;
  if (o.round_robin) {
    parts.push_back(R"("loadBalancingConfig":[{"round_robin":{}}])");
    parts.push_back(R"("healthCheckConfig":{"serviceName":""})");
  }
  if (!o.retry_service.empty() || o.wait_for_ready) {
    std::string mc =
        absl::StrCat(R"("methodConfig":[{"name":[{"service":")", o.retry_service, R"("}])");
    if (o.wait_for_ready) absl::StrAppend(&mc, R"(,"waitForReady":true)");
    if (!o.retry_service.empty() && o.max_attempts > 1) {
      absl::StrAppend(&mc, R"(,"retryPolicy":{"maxAttempts":)", std::min(o.max_attempts, 5),
                      R"(,"initialBackoff":"0.05s","maxBackoff":"1s","backoffMultiplier":2,)",
                      R"("retryableStatusCodes":["UNAVAILABLE","RESOURCE_EXHAUSTED"]})");
    }
    absl::StrAppend(&mc, "}]");
    parts.push_back(std::move(mc));
  }
  return absl::StrCat("{", absl::StrJoin(parts, ","), "}");
}

std::shared_ptr<grpc::Channel> MakeChannel(const std::string& target,
                                           const ChannelOptions& options) {
  grpc::ChannelArguments args = DefaultChannelArguments();
  if (options.round_robin) args.SetLoadBalancingPolicyName("round_robin");
  // gRPC retries a call only while its request still fits the retry buffer (256 KiB by
  // default, less than one batch of activations); past it the call is committed and only
  // the callers' own retries remain.
  if (!options.retry_service.empty()) args.SetInt(GRPC_ARG_PER_RPC_RETRY_BUFFER_SIZE, 64 << 20);
  const std::string config = ChannelServiceConfig(options);
  if (config != "{}") args.SetServiceConfigJSON(config);
  return grpc::CreateCustomChannel(target, ClientChannelCredentials(), args);
}

std::shared_ptr<grpc::Channel> MakeChannel(const std::string& target, bool round_robin) {
  ChannelOptions o;
  o.round_robin = round_robin;
  return MakeChannel(target, o);
}

bool IsMultiAddressTarget(const std::string& target) {
  if (absl::StartsWith(target, "dns:")) return true;
  if (absl::StartsWith(target, "ipv4:") || absl::StartsWith(target, "ipv6:"))
    return absl::StrContains(target, ',');
  return false;
}

}  // namespace moemesh
