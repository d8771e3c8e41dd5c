// ServerHost: the common frame of every moemesh gRPC server.
//
// It binds the address (port 0 picks a free port), registers grpc.health.v1 and server
// reflection next to the service, sets message-size limits (large between internal services,
// small on the public gateway), sets HTTP/2 keepalive so that a peer that vanished or froze
// (SIGSTOP, a dead node) is noticed in seconds rather than by the kernel's TCP timeout, and
// drains gracefully: Drain marks health NOT_SERVING, keeps serving for `not_serving_grace`
// (so load balancers and probes move traffic away first), then stops accepting calls and
// waits up to the grace period for in-flight calls before cancelling the rest.
//
// Shutdown signals: call BlockShutdownSignals() first thing in main; SIGTERM/SIGINT then
// no longer kill the process but wake WaitForShutdownSignal() (or make ShutdownSignalFd()
// readable), whichever thread the kernel delivers them to.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "grpcpp/grpcpp.h"

namespace moemesh {

struct ServerHostOptions {
  std::string address = "127.0.0.1:0";
  std::string port_file;  // when set, the bound port is written here after start (atomically)
  // Largest message accepted; internal services carry whole batches of activations.
  int max_receive_message_bytes = 512 << 20;
  int max_send_message_bytes = 512 << 20;
  // When set, connections are closed (GOAWAY, in-flight calls finish within the grace) after
  // this age, so that clients re-resolve DNS names and spread over replicas added since.
  absl::Duration max_connection_age = absl::ZeroDuration();
  // TLS or mTLS (services/rpc/tls.h); null: plaintext.
  std::shared_ptr<grpc::ServerCredentials> credentials;
  // HTTP/2 keepalive pings on idle and busy connections; a peer that does not answer a ping
  // within the timeout is dropped and its calls fail UNAVAILABLE.
  absl::Duration keepalive_time = absl::Seconds(10);
  absl::Duration keepalive_timeout = absl::Seconds(5);
};

class ServerHost {
 public:
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<ServerHost>> Start(
      const ServerHostOptions& options, const std::vector<grpc::Service*>& services);
  ~ServerHost();

  int port() const { return port_; }
  std::string address() const;
  void SetServing(bool serving);
  // Sets the grpc.health.v1 status of one named service (e.g. a condition to report).
  void SetServiceServing(const std::string& service, bool serving);
  // NOT_SERVING; after `not_serving_grace` (calls are still served meanwhile) Shutdown with
  // the grace period for in-flight calls; returns when the server has stopped.
  void Drain(absl::Duration grace, absl::Duration not_serving_grace = absl::ZeroDuration());

 private:
  ServerHost() = default;
  std::unique_ptr<grpc::Server> server_;
  std::string host_;
  int port_ = 0;
  bool drained_ = false;
};

void BlockShutdownSignals();
// Blocks until SIGTERM or SIGINT; returns the signal number.
int WaitForShutdownSignal();
// Readable (one byte per signal) once a shutdown signal arrived; -1 before BlockShutdownSignals.
int ShutdownSignalFd();

// Channel arguments every moemesh client uses: message sizes, fast reconnect, keepalive
// (a ping every 10 s, also without calls in flight; no answer in 5 s drops the connection).
grpc::ChannelArguments DefaultChannelArguments(int max_message_bytes = 512 << 20);

struct ChannelOptions {
  // Balance over every address the target resolves to (dns:///, ipv4:a,b), with gRPC health
  // checking, instead of pick_first.
  bool round_robin = false;
  // gRPC-level retry policy for every method of `service` (e.g. "moemesh.v1.Router"): a call
  // that fails with UNAVAILABLE or RESOURCE_EXHAUSTED before any response arrived is retried
  // up to `max_attempts` times with exponential backoff; on a round_robin channel each
  // attempt is a new pick, so it lands on another address. Empty: no retry policy.
  std::string retry_service;
  int max_attempts = 3;
  // Calls wait for the channel to connect (within their deadline) instead of failing at
  // once while the peer restarts.
  bool wait_for_ready = false;
};
std::shared_ptr<grpc::Channel> MakeChannel(const std::string& target, bool round_robin = false);
std::shared_ptr<grpc::Channel> MakeChannel(const std::string& target,
                                           const ChannelOptions& options);
// The service config JSON MakeChannel gives a channel with `options`.
std::string ChannelServiceConfig(const ChannelOptions& options);

// True for a target that may resolve to several addresses: dns:///…, or an ipv4:/ipv6: list
// with more than one address.
bool IsMultiAddressTarget(const std::string& target);

}  // namespace moemesh
