// The mesh contract: real processes, real gRPC on loopback, compared with the single-process
// engine on the same generated checkpoint.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <fstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "grpcpp/generic/generic_stub.h"
#include "gtest/gtest.h"
#include "services/engine/inproc.h"
#include "services/rpc/server_host.h"
#include "services/rpc/tensor_proto.h"
#include "tests/mesh_util.h"
#include "tests/test_util.h"

namespace moemesh::testing {
namespace {

class MeshTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir();
    GeneratorOptions g;
    g.config = SmallMixtralConfig(128, 64, 96, 3, 4, 2, 8, 2);
    g.seed = 11;
    model_ = new std::string(MakeModel(*dir_, "model", g));
    auto m = InprocModel::Load(*model_);
    ASSERT_TRUE(m.ok()) << m.status();
    inproc_ = m->release();
  }
  static void TearDownTestSuite() {
    delete inproc_;
    delete model_;
    delete dir_;
  }
  static std::vector<int32_t> Tokens(int n, int salt) {
    std::vector<int32_t> t;
    for (int i = 0; i < n; ++i) t.push_back((i * 37 + salt * 11 + 5) % 128);
    return t;
  }

  static TempDir* dir_;
  static std::string* model_;
  static InprocModel* inproc_;
};
TempDir* MeshTest::dir_ = nullptr;
std::string* MeshTest::model_ = nullptr;
InprocModel* MeshTest::inproc_ = nullptr;

struct Layout {
  int groups;
  int replicas;
};

class MeshLayoutTest : public MeshTest, public ::testing::WithParamInterface<Layout> {};

TEST_P(MeshLayoutTest, LogitsMatchSingleProcess) {
  const Layout l = GetParam();
  MeshOptions o = TestMeshOptions(
      *model_, dir_->Join(absl::StrCat("work-", l.groups, "-", l.replicas)), l.groups, l.replicas);
  o.gateway_args = {"--max_step_tokens=16"};  // prompts longer than 16 are prefilled in chunks
  auto mesh = Mesh::Start(o);
  ASSERT_TRUE(mesh.ok()) << mesh.status();
  auto gw = GatewayClient((*mesh)->gateway_address());
  for (int n : {1, 7, 40}) {
    const std::vector<int32_t> tokens = Tokens(n, n);
    ExpectScoreMatchesEngine(gw.get(), *inproc_->engine, tokens);
  }
  EXPECT_TRUE((*mesh)->Stop().ok());
}

TEST_F(MeshTest, GroupsNamedByDnsWork) {
  MeshOptions o = TestMeshOptions(*model_, dir_->Join("work-dns"), 2);
  o.dns_targets = true;
  auto mesh = Mesh::Start(o);
  ASSERT_TRUE(mesh.ok()) << mesh.status();
  auto gw = GatewayClient((*mesh)->gateway_address());
  const std::vector<int32_t> tokens = Tokens(12, 3);
  auto got = ScoreViaGateway(gw.get(), tokens);
  ASSERT_TRUE(got.ok()) << got.status();
  auto want = inproc_->engine->Score(tokens);
  ASSERT_TRUE(want.ok());
  EXPECT_LE(MaxAbsDiff(got->data(), want->data(), got->numel()), 1e-4);
  EXPECT_TRUE((*mesh)->Stop().ok());
}

INSTANTIATE_TEST_SUITE_P(Layouts, MeshLayoutTest,
                         ::testing::Values(Layout{1, 1}, Layout{2, 1}, Layout{4, 1}, Layout{2, 2}),
                         [](const auto& info) {
                           return absl::StrCat("groups", info.param.groups, "_replicas",
                                               info.param.replicas);
                         });

TEST_F(MeshTest, ConcurrentGreedyGenerationMatchesSingleProcess) {
  auto mesh = Mesh::Start(TestMeshOptions(*model_, dir_->Join("work-concurrent"), 2));
  ASSERT_TRUE(mesh.ok()) << mesh.status();
  std::vector<std::vector<int32_t>> prompts;
  for (int i = 0; i < 8; ++i) prompts.push_back(Tokens(1 + i * 5, i));
  const int kMax = 12;
  const auto want = GenerateInproc(*model_, prompts, kMax);
  const auto got = GenerateConcurrentlyViaGateway((*mesh)->gateway_address(), prompts, kMax);
  for (size_t i = 0; i < prompts.size(); ++i) {
    ASSERT_TRUE(got[i].ok()) << got[i].status();
    EXPECT_EQ(*got[i], want[i]) << "prompt " << i;
  }
  EXPECT_TRUE((*mesh)->Stop().ok());
}

// Batch invariance through the mesh (issue 8, section 5): a request's logits are bitwise the
// same served alone and among 16 concurrent others, whatever the batches the gateway forms.
// Prompts are never chunked here (--max_step_tokens above any prompt): chunk boundaries are
// the one thing a request's logits may depend on.
TEST_F(MeshTest, LogitsAreBitwiseEqualAloneAndAmongSixteenOthers) {
  MeshOptions o = TestMeshOptions(*model_, dir_->Join("work-invariance"), 2);
  o.gateway_args = {"--max_step_tokens=4096"};
  auto mesh = Mesh::Start(o);
  ASSERT_TRUE(mesh.ok()) << mesh.status();
  auto gw = GatewayClient((*mesh)->gateway_address());
  const std::vector<int32_t> probe = Tokens(9, 42);
  auto alone = ScoreViaGateway(gw.get(), probe);
  ASSERT_TRUE(alone.ok()) << alone.status();
  for (int trial = 0; trial < 3; ++trial) {
    std::vector<absl::StatusOr<Tensor>> got(17);
    std::vector<std::thread> threads;
    for (int i = 0; i < 17; ++i) {
      threads.emplace_back([&, i] {
        auto c = GatewayClient((*mesh)->gateway_address());
        got[i] =
            ScoreViaGateway(c.get(), i == 8 + trial ? probe : Tokens(1 + (i * 7) % 23, i + trial));
      });
    }
    for (auto& t : threads) t.join();
    ASSERT_TRUE(got[8 + trial].ok()) << got[8 + trial].status();
    const Tensor& p = *got[8 + trial];
    ASSERT_EQ(p.shape(), alone->shape());
    EXPECT_EQ(std::memcmp(p.data(), alone->data(), p.numel() * sizeof(float)), 0)
        << "trial " << trial << ": max diff " << MaxAbsDiff(p.data(), alone->data(), p.numel());
  }
  EXPECT_TRUE((*mesh)->Stop().ok());
}

TEST_F(MeshTest, BadLayerOrExpertGetsAClearErrorAndServiceContinues) {
  auto mesh = Mesh::Start(TestMeshOptions(*model_, dir_->Join("work-errors"), 2));
  ASSERT_TRUE(mesh.ok()) << mesh.status();
  const int64_t h = inproc_->config.hidden_size;
  Tensor x = Tensor::FromVector({2, h}, RandomFloats(2 * h, 3));

  // Every call below must reach its server, whose answer is checked: each waits (within a
  // deadline) for its channel to connect rather than failing at once with UNAVAILABLE if a
  // first connection attempt fails on a loaded machine.
  auto router = RouterClient((*mesh)->router_address());
  {
    grpc::ClientContext ctx;
    WaitForReady(&ctx, absl::Seconds(120));
    v1::ForwardRequest req;
    req.set_layer(99);
    TensorToProto(x, DType::kF32, req.mutable_hidden());
    v1::ForwardResponse resp;
    grpc::Status s = router->Forward(&ctx, req, &resp);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_NE(s.error_message().find("layer 99"), std::string::npos) << s.error_message();
  }
  {
    grpc::ClientContext ctx;
    WaitForReady(&ctx, absl::Seconds(120));
    v1::ForwardRequest req;
    req.set_layer(0);
    TensorToProto(Tensor::FromVector({2, h + 1}, RandomFloats(2 * (h + 1), 3)), DType::kF32,
                  req.mutable_hidden());
    v1::ForwardResponse resp;
    EXPECT_EQ(router->Forward(&ctx, req, &resp).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  }
  // Worker g0 holds experts 0-3.
  const Mesh::Process& w0 = (*mesh)->workers()[0];
  ASSERT_EQ(w0.group, 0);
  auto worker = WorkerClient(w0.address);
  auto run = [&](int layer, int expert, grpc::Status* status, v1::RunExpertsResponse* resp) {
    grpc::ClientContext ctx;
    WaitForReady(&ctx, absl::Seconds(120));
    v1::RunExpertsRequest req;
    req.set_layer(layer);
    TensorToProto(x, DType::kF32, req.mutable_tokens());
    for (int v : {0, 1, 2}) req.add_offsets(v);
    req.add_experts(expert);
    req.add_weights(0.5f);
    req.add_experts(expert);
    req.add_weights(0.5f);
    *status = worker->RunExperts(&ctx, req, resp);
  };
  grpc::Status s;
  v1::RunExpertsResponse resp;
  run(0, 99, &s, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
  EXPECT_NE(s.error_message().find("expert 99"), std::string::npos) << s.error_message();
  run(0, 5, &s, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND) << s.error_message();
  EXPECT_NE(s.error_message().find("expert 5"), std::string::npos) << s.error_message();
  run(7, 1, &s, &resp);
  EXPECT_TRUE(s.error_code() == grpc::StatusCode::NOT_FOUND ||
              s.error_code() == grpc::StatusCode::INVALID_ARGUMENT)
      << s.error_message();
  {
    grpc::ClientContext ctx;
    WaitForReady(&ctx, absl::Seconds(120));
    v1::RunExpertsRequest req;
    req.set_layer(0);
    TensorToProto(x, DType::kF32, req.mutable_tokens());
    req.mutable_tokens()->mutable_data()->resize(7);  // bytes do not match the shape
    grpc::Status bad = worker->RunExperts(&ctx, req, &resp);
    EXPECT_EQ(bad.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  }
  // Still serving: a valid call succeeds and a request through the gateway works.
  run(0, 2, &s, &resp);
  EXPECT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(resp.output().shape_size(), 2);
  auto gw = GatewayClient((*mesh)->gateway_address());
  EXPECT_TRUE(ScoreViaGateway(gw.get(), {1, 2, 3}).ok());
  // Bad requests at the gateway are INVALID_ARGUMENT too.
  auto bad_tok = ScoreViaGateway(gw.get(), {1, 999});
  EXPECT_EQ(bad_tok.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE((*mesh)->Stop().ok());
}

// The router and the workers read their requests with services/rpc/wire_codec, not protobuf's
// generated parser. A client may encode a message in any way protobuf accepts: fields out of
// order, unpacked repeated fields, unknown fields, a message field sent in two pieces (merged).
// Such requests, sent as raw bytes, get answers bitwise equal to the canonical encoding's.

TEST_F(MeshTest, NonCanonicalEncodingsGetTheCanonicalAnswers) {
  auto mesh = Mesh::Start(TestMeshOptions(*model_, dir_->Join("work-noncanonical"), 2));
  ASSERT_TRUE(mesh.ok()) << mesh.status();
  const int64_t h = inproc_->config.hidden_size;
  const Tensor x = Tensor::FromVector({3, h}, RandomFloats(3 * h, 11));
  const std::string data(reinterpret_cast<const char*>(x.data()), x.numel() * sizeof(float));
  // Sends `bytes` to `method` as they are; returns the response's bytes.
  auto raw = [&](const std::string& address, const std::string& method,
                 const std::string& bytes) -> absl::StatusOr<std::string> {
    grpc::GenericStub stub(MakeChannel(address));
    grpc::ClientContext ctx;
    WaitForReady(&ctx, absl::Seconds(120));
    grpc::Slice slice(bytes);
    grpc::ByteBuffer req(&slice, 1), resp;
    absl::Notification done;
    grpc::Status status;
    stub.UnaryCall(&ctx, method, grpc::StubOptions(), &req, &resp, [&](grpc::Status s) {
      status = std::move(s);
      done.Notify();
    });
    done.WaitForNotification();
    if (!status.ok()) return FromGrpcStatus(status);
    std::vector<grpc::Slice> slices;
    EXPECT_TRUE(resp.Dump(&slices).ok());
    std::string out;
    for (const grpc::Slice& sl : slices) {
      out.append(reinterpret_cast<const char*>(sl.begin()), sl.size());
    }
    return out;
  };
  auto output = [&](const absl::StatusOr<std::string>& bytes) -> Tensor {
    EXPECT_TRUE(bytes.ok()) << bytes.status();
    v1::ForwardResponse r;
    if (!bytes.ok() || !r.ParseFromString(*bytes)) return Tensor();
    auto t = TensorFromProto(r.output(), "output", 2);
    EXPECT_TRUE(t.ok()) << t.status();
    return t.ok() ? *t : Tensor();
  };
  auto same = [](const Tensor& a, const Tensor& b) {
    return !a.empty() && a.shape() == b.shape() &&
           std::memcmp(a.data(), b.data(), a.numel() * sizeof(float)) == 0;
  };

  // Router Forward, layer 1, F32 in and out.
  v1::ForwardRequest canonical;
  canonical.set_layer(1);
  TensorToProto(x, DType::kF32, canonical.mutable_hidden());
  canonical.set_output_dtype(v1::DTYPE_F32);
  const Tensor want = output(
      raw((*mesh)->router_address(), "/moemesh.v1.Router/Forward", canonical.SerializeAsString()));
  ASSERT_FALSE(want.empty());
  {
    // Output dtype first, an unknown field, the tensor in two pieces (shape unpacked, then the
    // data, then the dtype), the layer last.
    std::string first, second, msg;
    AppendTag(2, 0, &first);
    AppendVarint(3, &first);
    AppendTag(2, 0, &first);
    AppendVarint(static_cast<uint64_t>(h), &first);
    AppendBytesField(3, data, &second);
    AppendTag(1, 0, &second);
    AppendVarint(v1::DTYPE_F32, &second);
    AppendTag(3, 0, &msg);
    AppendVarint(v1::DTYPE_F32, &msg);
    AppendBytesField(77, "not a field of ForwardRequest", &msg);
    AppendBytesField(2, first, &msg);
    AppendBytesField(2, second, &msg);
    AppendTag(1, 0, &msg);
    AppendVarint(1, &msg);
    v1::ForwardRequest check;  // protobuf reads it as the canonical request
    ASSERT_TRUE(check.ParseFromString(msg));
    check.DiscardUnknownFields();
    ASSERT_TRUE(check.SerializeAsString() == canonical.SerializeAsString());
    EXPECT_TRUE(
        same(output(raw((*mesh)->router_address(), "/moemesh.v1.Router/Forward", msg)), want));
  }

  // Worker RunExperts: 3 tokens, experts 1 and 2 (group 0 holds 0-3).
  v1::RunExpertsRequest run;
  run.set_layer(0);
  TensorToProto(x, DType::kF32, run.mutable_tokens());
  for (int v : {0, 2, 3, 4}) run.add_offsets(v);
  for (int e : {1, 2, 2, 1}) run.add_experts(e);
  for (float w : {0.75f, 0.25f, 1.0f, 0.5f}) run.add_weights(w);
  run.set_output_dtype(v1::DTYPE_F32);
  const std::string worker = (*mesh)->workers()[0].address;
  const Tensor want_run =
      output(raw(worker, "/moemesh.v1.ExpertWorker/RunExperts", run.SerializeAsString()));
  ASSERT_FALSE(want_run.empty());
  {
    // Every repeated field unpacked, in reverse field order.
    std::string msg;
    AppendTag(6, 0, &msg);
    AppendVarint(v1::DTYPE_F32, &msg);
    for (float w : run.weights()) {
      AppendTag(5, 5, &msg);
      msg.append(reinterpret_cast<const char*>(&w), 4);
    }
    for (int e : run.experts()) {
      AppendTag(4, 0, &msg);
      AppendVarint(static_cast<uint64_t>(e), &msg);
    }
    for (int o : run.offsets()) {
      AppendTag(3, 0, &msg);
      AppendVarint(static_cast<uint64_t>(o), &msg);
    }
    AppendBytesField(2, run.tokens().SerializeAsString(), &msg);
    v1::RunExpertsRequest check;
    ASSERT_TRUE(check.ParseFromString(msg));
    ASSERT_TRUE(check.SerializeAsString() == run.SerializeAsString());
    EXPECT_TRUE(same(output(raw(worker, "/moemesh.v1.ExpertWorker/RunExperts", msg)), want_run));
  }
  // Bytes protobuf rejects are INVALID_ARGUMENT, and the services keep serving.
  auto bad = raw((*mesh)->router_address(), "/moemesh.v1.Router/Forward",
                 canonical.SerializeAsString().substr(0, 40));
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument) << bad.status();
  bad = raw(worker, "/moemesh.v1.ExpertWorker/RunExperts", std::string("\x12\x05\x08", 3));
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument) << bad.status();
  EXPECT_TRUE(same(output(raw((*mesh)->router_address(), "/moemesh.v1.Router/Forward",
                              canonical.SerializeAsString())),
                   want));
  EXPECT_TRUE((*mesh)->Stop().ok());
}

TEST_F(MeshTest, RouterRefusesToStartWhenAnExpertIsMissing) {
  MeshOptions o = TestMeshOptions(*model_, dir_->Join("work-missing"), 2);
  o.group_experts = {"0-3", "4-6"};  // nobody holds expert 7
  o.startup_timeout = absl::Seconds(60);
  auto mesh = Mesh::Start(o);
  ASSERT_FALSE(mesh.ok());
  EXPECT_NE(mesh.status().message().find("expert 7"), std::string::npos) << mesh.status();
}

TEST_F(MeshTest, UpCommandServesARequestAndStopsCleanly) {
  const std::string addr_file = dir_->Join("up.addr");
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    const std::string bin = std::string(MOEMESH_BIN_DIR) + "/moemesh";
    const std::string log = dir_->Join("up.log");
    FILE* f = std::freopen(log.c_str(), "w", stderr);
    (void)f;
    ::execl(bin.c_str(), bin.c_str(), "up", ("--model=" + *model_).c_str(), "--groups=2",
            ("--address_file=" + addr_file).c_str(), static_cast<char*>(nullptr));
    ::_exit(127);
  }
  std::string address;
  for (int i = 0; i < 600 && address.empty(); ++i) {
    std::ifstream in(addr_file);
    in >> address;
    if (address.empty()) absl::SleepFor(absl::Milliseconds(100));
  }
  ASSERT_FALSE(address.empty()) << ReadFileOrDie(dir_->Join("up.log"));
  auto gw = GatewayClient(address);
  auto got = GenerateViaGateway(gw.get(), {1, 2, 3}, 5);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(*got, GenerateInproc(*model_, {{1, 2, 3}}, 5)[0]);
  ASSERT_EQ(::kill(pid, SIGTERM), 0);
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status << "\n"
                                                             << ReadFileOrDie(dir_->Join("up.log"));
}

}  // namespace
}  // namespace moemesh::testing
