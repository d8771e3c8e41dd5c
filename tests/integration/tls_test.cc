// Mutual TLS between and into the services: the whole mesh (gateway → router → workers, and
// the client → gateway) with certificates from a throwaway CA gives the same tokens as the
// single process; a client without a certificate, with one from another CA, or with the wrong
// key is refused at the handshake; the HTTP port serves HTTPS.
#include "services/rpc/tls.h"

#include <cstdio>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "tests/mesh_util.h"
#include "tests/test_util.h"

namespace moemesh::testing {
namespace {

// ModelInfo over a new channel with these credentials. A probe meant to be refused fails fast
// (a refused handshake ends it with UNAVAILABLE at once); one meant to be accepted passes
// `accepted` and waits for the connection (up to 60 s), since a first connection attempt can
// fail on a loaded machine for reasons that have nothing to do with the certificates.
grpc::Status Probe(const std::string& address, std::shared_ptr<grpc::ChannelCredentials> creds,
                   bool accepted = false) {
  auto stub = v1::Gateway::NewStub(grpc::CreateChannel(address, creds));
  grpc::ClientContext ctx;
  if (accepted) {
    WaitForReady(&ctx, absl::Seconds(60));
  } else {
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(5)));
  }
  v1::ModelInfoResponse resp;
  return stub->ModelInfo(&ctx, v1::ModelInfoRequest(), &resp);
}

TlsConfig Load(const std::string& cert, const std::string& key, const std::string& ca) {
  auto t = LoadTls({cert, key, ca});
  EXPECT_TRUE(t.ok()) << t.status();
  return t.ok() && t->has_value() ? **t : TlsConfig{};
}

int CurlStatus(const std::string& args) {
  FILE* p = ::popen(absl::StrCat("curl -s -o /dev/null -w '%{http_code}' ", args).c_str(), "r");
  char buf[16] = {0};
  const size_t n = std::fread(buf, 1, sizeof(buf) - 1, p);
  ::pclose(p);
  return n > 0 ? std::atoi(buf) : -1;
}

TEST(TlsTest, MutualTlsMeshGivesTheSameTokensAndRefusesStrangers) {
  TempDir dir;
  const std::string pki = dir.Join("pki"), other = dir.Join("other");
  ASSERT_TRUE(MakeLocalCertificates(pki).ok());
  ASSERT_TRUE(MakeLocalCertificates(other).ok());
  const std::string model = MakeSmallModel(dir);
  MeshOptions o = TestMeshOptions(model, dir.Join("mesh"), /*groups=*/2);
  o.tls = {pki + "/node.crt", pki + "/node.key", pki + "/ca.crt"};
  const std::string http_port_file = dir.Join("http.port");
  o.gateway_args = {"--http_port=0", "--http_port_file=" + http_port_file};
  auto mesh = Mesh::Start(o);  // also makes this process the mesh's TLS client
  ASSERT_TRUE(mesh.ok()) << mesh.status();
  const std::string addr = (*mesh)->gateway_address();

  // The same greedy tokens as the single process, through TLS on every hop.
  const std::vector<std::vector<int32_t>> prompts = {{1, 2, 3, 4}, {9, 8, 7}};
  const auto want = GenerateInproc(model, prompts, 10);
  auto gw = GatewayClient(addr);
  for (size_t i = 0; i < prompts.size(); ++i) {
    auto got = GenerateViaGateway(gw.get(), prompts[i], 10);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(*got, want[i]);
  }

  const TlsConfig good = Load(pki + "/node.crt", pki + "/node.key", pki + "/ca.crt");
  EXPECT_TRUE(Probe(addr, ChannelCredentials(good), /*accepted=*/true).ok());
  // Plaintext, no client certificate, another CA's certificate, the wrong key: all refused.
  EXPECT_FALSE(Probe(addr, grpc::InsecureChannelCredentials()).ok());
  grpc::SslCredentialsOptions server_only;
  server_only.pem_root_certs = good.ca_pem;
  EXPECT_FALSE(Probe(addr, grpc::SslCredentials(server_only)).ok());
  const TlsConfig stranger = Load(other + "/node.crt", other + "/node.key", pki + "/ca.crt");
  EXPECT_FALSE(Probe(addr, ChannelCredentials(stranger)).ok());
  const TlsConfig wrong_key = Load(pki + "/node.crt", other + "/node.key", pki + "/ca.crt");
  EXPECT_FALSE(Probe(addr, ChannelCredentials(wrong_key)).ok());
  // A client that trusts another CA does not accept the gateway's certificate.
  const TlsConfig other_ca = Load(pki + "/node.crt", pki + "/node.key", other + "/ca.crt");
  EXPECT_FALSE(Probe(addr, ChannelCredentials(other_ca)).ok());

  // HTTPS on the HTTP port, verified against the CA; plain HTTP and an unknown CA fail.
  for (int i = 0; i < 200 && !std::filesystem::exists(http_port_file); ++i)
    absl::SleepFor(absl::Milliseconds(50));
  const std::string port = std::to_string(std::stoi(ReadFileOrDie(http_port_file)));
  EXPECT_EQ(
      CurlStatus(absl::StrCat("--cacert ", pki, "/ca.crt https://127.0.0.1:", port, "/health")),
      200);
  EXPECT_NE(
      CurlStatus(absl::StrCat("--cacert ", other, "/ca.crt https://127.0.0.1:", port, "/health")),
      200);
  EXPECT_NE(CurlStatus(absl::StrCat("http://127.0.0.1:", port, "/health")), 200);
  EXPECT_TRUE((*mesh)->Stop().ok());
  SetClientTls(std::nullopt);
}

TEST(TlsTest, BadTlsFilesAreClearErrors) {
  TempDir dir;
  ASSERT_TRUE(MakeLocalCertificates(dir.path()).ok());
  EXPECT_EQ(LoadTls({dir.Join("node.crt"), "", ""}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(LoadTls({"", "", dir.Join("ca.crt")}).status().code(),
            absl::StatusCode::kInvalidArgument);
  auto missing = LoadTls({dir.Join("nope.crt"), dir.Join("node.key"), ""});
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.status().message().find("nope.crt"), std::string::npos);
  WriteFileOrDie(dir.Join("junk.pem"), "not a certificate");
  EXPECT_FALSE(LoadTls({dir.Join("junk.pem"), dir.Join("node.key"), ""}).ok());
  auto none = LoadTls({});
  ASSERT_TRUE(none.ok());
  EXPECT_FALSE(none->has_value());
}

}  // namespace
}  // namespace moemesh::testing
