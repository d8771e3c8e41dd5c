// TLS and mutual TLS for every moemesh connection.
//
// A service given a certificate and its key serves TLS; given a CA as well, it requires client
// certificates signed by that CA (mTLS) and its own outgoing channels (gateway → router →
// workers, CLI → gateway) present the same certificate and verify the server against the CA.
// Without files everything stays plaintext, as before.
//
//   ASSIGN_OR_RETURN(std::optional<TlsConfig> tls, LoadTls({cert, key, ca}));
//   SetClientTls(tls);                                   // main(), before any channel exists
//   host_options.credentials = ServerCredentials(tls);   // the gRPC server
//
// The client side is process-wide on purpose: every channel a process makes (to its router,
// its workers, health checks) speaks the same protocol with the same identity, so main sets it
// once and MakeChannel applies it. Thread-safe after SetClientTls, which main calls before any
// other thread makes a channel.
#pragma once

#include <memory>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "grpcpp/grpcpp.h"

namespace moemesh {

struct TlsFiles {
  std::string cert;  // PEM certificate chain
  std::string key;   // PEM private key of the certificate
  std::string ca;    // PEM CA bundle: verify peers against it (and require client certs)
};

struct TlsConfig {
  std::string cert_pem, key_pem, ca_pem;
  bool mutual() const { return !ca_pem.empty(); }
};

// Reads the files. Nothing given: no TLS (nullopt). A certificate needs its key and the other
// way round; a CA alone is an error too; unreadable or non-PEM files are errors naming them.
[[nodiscard]] absl::StatusOr<std::optional<TlsConfig>> LoadTls(const TlsFiles& files);

// Server credentials: insecure without TLS; TLS; or mTLS (client certificates required and
// verified against the CA) when the config has a CA.
std::shared_ptr<grpc::ServerCredentials> ServerCredentials(const std::optional<TlsConfig>& tls);
// Channel credentials: insecure without TLS; otherwise verify the server against the CA (the
// system roots without one) and present the certificate when there is one.
std::shared_ptr<grpc::ChannelCredentials> ChannelCredentials(const std::optional<TlsConfig>& tls);

// Writes a throwaway PKI into `dir` with the openssl command line tool: ca.crt/ca.key (a new
// CA) and node.crt/node.key (signed by it, for 127.0.0.1 and localhost, usable as server and
// as client), valid for 7 days. For `moemesh up --tls` and tests; production certificates
// come from the platform (cert-manager, deploy/).
[[nodiscard]] absl::Status MakeLocalCertificates(const std::string& dir);

// The process's client side (see above).
void SetClientTls(std::optional<TlsConfig> tls);
std::shared_ptr<grpc::ChannelCredentials> ClientChannelCredentials();

}  // namespace moemesh
