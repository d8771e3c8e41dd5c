#include "services/rpc/tls.h"

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"

namespace moemesh {
namespace {

absl::StatusOr<std::string> ReadPem(const std::string& path, const char* what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::InvalidArgumentError(absl::StrCat("cannot read the TLS ", what, " ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  std::string pem = ss.str();
  if (!absl::StrContains(pem, "-----BEGIN "))
    return absl::InvalidArgumentError(absl::StrCat("the TLS ", what, " ", path, " is not PEM"));
  return pem;
}

struct ClientState {
  absl::Mutex mu;
  std::shared_ptr<grpc::ChannelCredentials> creds ABSL_GUARDED_BY(mu);
};

ClientState& Client() {
  static ClientState* state = new ClientState();  // never destroyed: channels may outlive main
  return *state;
}

}  // namespace

absl::StatusOr<std::optional<TlsConfig>> LoadTls(const TlsFiles& f) {
  if (f.cert.empty() && f.key.empty() && f.ca.empty()) return std::optional<TlsConfig>();
  if (f.cert.empty() != f.key.empty())
    return absl::InvalidArgumentError("give --tls_cert and --tls_key together");
  if (f.cert.empty())
    return absl::InvalidArgumentError("--tls_ca needs --tls_cert and --tls_key (mutual TLS)");
  TlsConfig c;
  auto cert = ReadPem(f.cert, "certificate");
  if (!cert.ok()) return cert.status();
  auto key = ReadPem(f.key, "key");
  if (!key.ok()) return key.status();
  c.cert_pem = *std::move(cert);
  c.key_pem = *std::move(key);
  if (!f.ca.empty()) {
    auto ca = ReadPem(f.ca, "CA");
    if (!ca.ok()) return ca.status();
    c.ca_pem = *std::move(ca);
  }
  return std::optional<TlsConfig>(std::move(c));
}

std::shared_ptr<grpc::ServerCredentials> ServerCredentials(const std::optional<TlsConfig>& tls) {
  if (!tls) return grpc::InsecureServerCredentials();
  grpc::SslServerCredentialsOptions o(
      tls->mutual() ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
                    : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  o.pem_root_certs = tls->ca_pem;
  o.pem_key_cert_pairs.push_back({tls->key_pem, tls->cert_pem});
  return grpc::SslServerCredentials(o);
}

std::shared_ptr<grpc::ChannelCredentials> ChannelCredentials(const std::optional<TlsConfig>& tls) {
  if (!tls) return grpc::InsecureChannelCredentials();
  grpc::SslCredentialsOptions o;
  o.pem_root_certs = tls->ca_pem;
  o.pem_private_key = tls->key_pem;
  o.pem_cert_chain = tls->cert_pem;
  return grpc::SslCredentials(o);
}

absl::Status MakeLocalCertificates(const std::string& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create ", dir, ": ", ec.message()));
  {
    std::ofstream ext(dir + "/node.ext");
    ext << "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
           "extendedKeyUsage=serverAuth,clientAuth\n"
           "basicConstraints=CA:FALSE\n";
    if (!ext) return absl::InternalError(absl::StrCat("cannot write ", dir, "/node.ext"));
  }
  const std::string key = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
  const std::string cmd = absl::StrCat(
      "cd '", dir, "' && (openssl req -x509 ", key,
      " -keyout ca.key -out ca.crt -days 7 -subj '/CN=moemesh local CA' && openssl req ", key,
      " -keyout node.key -out node.csr -subj '/CN=moemesh' && openssl x509 -req -in node.csr "
      "-CA ca.crt -CAkey ca.key -CAcreateserial -out node.crt -days 7 -extfile node.ext",
      ") >openssl.log 2>&1");
  if (std::system(cmd.c_str()) != 0)
    return absl::InternalError(absl::StrCat("openssl could not make certificates in ", dir,
                                            " (see ", dir, "/openssl.log)"));
  return absl::OkStatus();
}

void SetClientTls(std::optional<TlsConfig> tls) {
  auto creds = ChannelCredentials(tls);
  ClientState& s = Client();
  absl::MutexLock lock(&s.mu);
  s.creds = std::move(creds);
}

std::shared_ptr<grpc::ChannelCredentials> ClientChannelCredentials() {
  ClientState& s = Client();
  absl::MutexLock lock(&s.mu);
  if (!s.creds) s.creds = grpc::InsecureChannelCredentials();
  return s.creds;
}

}  // namespace moemesh
