// ServerHost: the common frame of every moemesh gRPC server.
//
// It binds the address (port 0 picks a free port), registers grpc.health.v1 and server
// reflection next to the service, sets message-size limits that fit activation payloads,
// and drains gracefully: Drain marks health NOT_SERVING, stops accepting calls and waits up
// to the grace period for in-flight calls before cancelling the rest.
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
  int max_message_bytes = 512 << 20;
  // When set, connections are closed (GOAWAY, in-flight calls finish within the grace) after
  // this age, so that clients re-resolve DNS names and spread over replicas added since.
  absl::Duration max_connection_age = absl::ZeroDuration();
  // TLS or mTLS (services/rpc/tls.h); null: plaintext.
  std::shared_ptr<grpc::ServerCredentials> credentials;
};

class ServerHost {
 public:
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<ServerHost>> Start(
      const ServerHostOptions& options, const std::vector<grpc::Service*>& services);
  ~ServerHost();

  int port() const { return port_; }
  std::string address() const;
  void SetServing(bool serving);
  // NOT_SERVING, then Shutdown with the grace period; returns when the server has stopped.
  void Drain(absl::Duration grace);

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

// Channel arguments every moemesh client uses (message sizes, keepalive).
grpc::ChannelArguments DefaultChannelArguments(int max_message_bytes = 512 << 20);
std::shared_ptr<grpc::Channel> MakeChannel(const std::string& target, bool round_robin = false);

}  // namespace moemesh
