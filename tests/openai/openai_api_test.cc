// The gateway's OpenAI-compatible HTTP API, driven by real clients: the official OpenAI Node
// SDK (npm package `openai`) and curl, against a mesh (gateway + router + 2 workers) started
// with an API key. Greedy outputs must equal gRPC Generate's for the same request, streamed
// and not. The npm install is part of the test: when it fails the test fails, never skips.
#include <sys/wait.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "services/rpc/tensor_proto.h"
#include "tests/mesh_util.h"
#include "tests/metrics_scrape.h"
#include "tests/test_util.h"

namespace moemesh::testing {
namespace {

using nlohmann::json;

constexpr const char* kKey = "sk-test-0123456789";
constexpr int kMaxTokens = 12;

// A ChatML template: the generated model's byte-level vocabulary has no template of its own.
constexpr const char* kChatMl =
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{%- endif %}";

// Runs a shell command; returns its exit status and standard output.
std::pair<int, std::string> Shell(const std::string& cmd) {
  std::string out;
  FILE* p = ::popen(cmd.c_str(), "r");
  if (p == nullptr) return {-1, ""};
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), p)) > 0) out.append(buf, n);
  const int status = ::pclose(p);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out};
}

class OpenAiApiTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir();
    // A vocabulary of 512 so that every byte (the generated tokenizer is byte-level) is a token.
    GeneratorOptions g;
    g.config = SmallMixtralConfig(512, 64, 96, 2, 4, 2, 8, 2);
    g.seed = 3;
    model_ = new std::string(MakeModel(*dir_, "tiny-moe", g));
    WriteFileOrDie(dir_->Join("chatml.jinja"), kChatMl);
    WriteFileOrDie(dir_->Join("keys"), absl::StrCat("# test keys\n", kKey, "\nsecond-key\n"));
    const std::string port_file = dir_->Join("http.port");
    MeshOptions o = TestMeshOptions(*model_, dir_->Join("mesh"), /*groups=*/2);
    o.metrics = true;
    o.gateway_args = {"--http_port=0", absl::StrCat("--http_port_file=", port_file),
                      absl::StrCat("--api_key_file=", dir_->Join("keys")),
                      absl::StrCat("--chat_template=", dir_->Join("chatml.jinja"))};
    auto mesh = Mesh::Start(o);
    ASSERT_TRUE(mesh.ok()) << mesh.status();
    mesh_ = mesh->release();
    for (int i = 0; i < 200 && !std::filesystem::exists(port_file); ++i)
      absl::SleepFor(absl::Milliseconds(50));
    base_ = new std::string(absl::StrCat("http://127.0.0.1:", std::stoi(ReadFileOrDie(port_file))));
  }
  static void TearDownTestSuite() {
    if (mesh_ != nullptr) {
      EXPECT_TRUE(mesh_->Stop().ok());
    }
    delete mesh_;
    delete base_;
    delete model_;
    delete dir_;
  }

  // curl with the key; returns {http code, body}.
  static std::pair<int, std::string> Curl(const std::string& method, const std::string& path,
                                          const std::string& body, const std::string& key = kKey,
                                          const std::string& extra = "", bool expect_ok = true) {
    const std::string body_file = dir_->Join("body.json");
    WriteFileOrDie(body_file, body);
    std::string cmd = absl::StrCat("curl -sS -N -X ", method, " -w '\\n%{http_code}' ", extra,
                                   " -H 'Content-Type: application/json'");
    if (!key.empty()) absl::StrAppend(&cmd, " -H 'Authorization: Bearer ", key, "'");
    if (!body.empty()) absl::StrAppend(&cmd, " --data-binary @", body_file);
    absl::StrAppend(&cmd, " ", *base_, path);
    auto [rc, out] = Shell(cmd);
    if (expect_ok) {
      EXPECT_EQ(rc, 0) << cmd;
    }
    const size_t nl = out.rfind('\n');
    return {std::atoi(out.c_str() + nl + 1), out.substr(0, nl)};
  }

  // gRPC Generate with the key: the reference text for the same request.
  static std::pair<std::string, int64_t> GrpcText(const v1::GenerateRequest& req) {
    auto stub = GatewayClient(mesh_->gateway_address());
    grpc::ClientContext ctx;
    ctx.AddMetadata("authorization", absl::StrCat("Bearer ", kKey));
    // A new channel: wait for it to connect rather than fail at once if a first connection
    // attempt fails on a loaded machine.
    WaitForReady(&ctx, absl::Seconds(60));
    auto reader = stub->Generate(&ctx, req);
    v1::GenerateResponse resp;
    std::string text;
    int64_t prompt = 0;
    while (reader->Read(&resp)) {
      text += resp.text();
      prompt = resp.usage().prompt_tokens();
    }
    EXPECT_TRUE(reader->Finish().ok());
    return {text, prompt};
  }

  static json Messages() {
    return json::parse(R"([{"role":"system","content":"You are terse."},
                           {"role":"user","content":"Say hello, über-briefly."}])");
  }

  static v1::GenerateRequest ChatRequest() {
    v1::GenerateRequest req;
    for (const auto& m : Messages()) {
      auto* pm = req.mutable_chat()->add_messages();
      pm->set_role(m["role"]);
      pm->set_content(m["content"]);
    }
    req.set_max_tokens(kMaxTokens);
    req.mutable_sampling()->set_temperature(0);
    req.set_ignore_eos(true);
    return req;
  }

  static double TokensAfterClientLeaves(bool stream, std::string* metrics_port);

  static TempDir* dir_;
  static std::string* model_;
  static Mesh* mesh_;
  static std::string* base_;
};
TempDir* OpenAiApiTest::dir_ = nullptr;
std::string* OpenAiApiTest::model_ = nullptr;
Mesh* OpenAiApiTest::mesh_ = nullptr;
std::string* OpenAiApiTest::base_ = nullptr;

TEST_F(OpenAiApiTest, OfficialNodeSdk) {
  // Install the SDK into the build tree.
  const std::string node_dir = MOEMESH_BINARY_DIR "/openai_node";
  std::filesystem::create_directories(node_dir);
  std::filesystem::copy_file(MOEMESH_SOURCE_DIR "/tests/openai/package.json",
                             node_dir + "/package.json",
                             std::filesystem::copy_options::overwrite_existing);
  std::filesystem::copy_file(MOEMESH_SOURCE_DIR "/tests/openai/sdk_check.mjs",
                             node_dir + "/sdk_check.mjs",
                             std::filesystem::copy_options::overwrite_existing);
  auto [rc, out] = Shell(
      absl::StrCat("cd ", node_dir, " && npm install --no-audit --no-fund --loglevel=error 2>&1"));
  ASSERT_EQ(rc, 0) << "npm could not install the OpenAI SDK (the test needs it):\n" << out;

  auto [chat_text, chat_prompt] = GrpcText(ChatRequest());
  v1::GenerateRequest comp;
  comp.set_prompt("Once upon a time");
  comp.set_max_tokens(kMaxTokens);
  comp.mutable_sampling()->set_temperature(0);
  comp.set_ignore_eos(true);
  auto [comp_text, comp_prompt] = GrpcText(comp);
  json expected = {
      {"chat",
       {{"messages", Messages()},
        {"max_tokens", kMaxTokens},
        {"text", chat_text},
        {"prompt_tokens", chat_prompt}}},
      {"completion",
       {{"prompt", "Once upon a time"}, {"max_tokens", kMaxTokens}, {"text", comp_text}}}};
  WriteFileOrDie(node_dir + "/expected.json",
                 expected.dump(-1, ' ', false, json::error_handler_t::strict));
  auto [src, log] = Shell(absl::StrCat("cd ", node_dir, " && node sdk_check.mjs ", *base_, "/v1 ",
                                       kKey, " tiny-moe expected.json 2>&1"));
  EXPECT_EQ(src, 0) << log;
  EXPECT_TRUE(absl::StrContains(log, "ALL OK")) << log;
}

TEST_F(OpenAiApiTest, Curl) {
  // Health and metrics need no key; everything else does.
  EXPECT_EQ(Curl("GET", "/health", "", "").first, 200);
  auto [no_key, body] = Curl("GET", "/v1/models", "", "");
  EXPECT_EQ(no_key, 401);
  auto err = json::parse(body, nullptr, false);
  ASSERT_TRUE(err.is_object()) << body;
  EXPECT_TRUE(err["error"]["message"].is_string());
  EXPECT_TRUE(err["error"].contains("type") && err["error"].contains("param") &&
              err["error"].contains("code"));
  EXPECT_EQ(Curl("GET", "/v1/models", "", "second-key").first, 200);
  auto [models_code, models] = Curl("GET", "/v1/models", "");
  EXPECT_EQ(models_code, 200);
  EXPECT_EQ(json::parse(models)["data"][0]["id"], "tiny-moe");

  // Non-streamed and streamed (-N) chat give the gRPC text.
  const std::string want = GrpcText(ChatRequest()).first;
  json req = {{"model", "tiny-moe"},
              {"messages", Messages()},
              {"max_tokens", kMaxTokens},
              {"temperature", 0},
              {"ignore_eos", true}};
  auto [code, resp] = Curl("POST", "/v1/chat/completions", req.dump());
  ASSERT_EQ(code, 200) << resp;
  auto j = json::parse(resp);
  EXPECT_EQ(j["choices"][0]["message"]["content"], want);
  EXPECT_EQ(j["usage"]["completion_tokens"], kMaxTokens);
  req["stream"] = true;
  req["stream_options"] = {{"include_usage", true}};
  auto [scode, sse] = Curl("POST", "/v1/chat/completions", req.dump());
  ASSERT_EQ(scode, 200);
  std::string streamed;
  bool done = false, usage = false;
  for (absl::string_view line : absl::StrSplit(sse, '\n')) {
    if (!absl::ConsumePrefix(&line, "data: ")) continue;
    if (line == "[DONE]") {
      done = true;
      continue;
    }
    auto chunk = json::parse(line);
    EXPECT_EQ(chunk["object"], "chat.completion.chunk");
    if (chunk.contains("usage") && chunk["usage"].is_object()) usage = true;
    for (auto& c : chunk["choices"])
      if (c["delta"].contains("content")) streamed += c["delta"]["content"].get<std::string>();
  }
  EXPECT_TRUE(done) << sse;
  EXPECT_TRUE(usage) << sse;
  EXPECT_EQ(streamed, want);

  // Completions with token ids, and echo.
  json comp = {{"prompt", json::array({1, 2, 3})},
               {"max_tokens", 4},
               {"temperature", 0},
               {"ignore_eos", true}};
  auto [ccode, cresp] = Curl("POST", "/v1/completions", comp.dump());
  EXPECT_EQ(ccode, 200) << cresp;
  EXPECT_EQ(json::parse(cresp)["usage"]["prompt_tokens"], 3);

  // tokenize / detokenize, as vLLM has them.
  auto [tcode, tresp] = Curl("POST", "/tokenize", R"({"prompt":"héllo"})");
  ASSERT_EQ(tcode, 200) << tresp;
  auto toks = json::parse(tresp)["tokens"];
  EXPECT_EQ(json::parse(tresp)["count"], toks.size());
  auto [dcode, dresp] = Curl("POST", "/detokenize", json{{"tokens", toks}}.dump());
  ASSERT_EQ(dcode, 200) << dresp;
  EXPECT_EQ(json::parse(dresp)["prompt"], "héllo") << tresp << " -> " << dresp;

  // Errors, with their statuses.
  EXPECT_EQ(Curl("POST", "/v1/chat/completions", "{not json").first, 400);
  json bad = req;
  bad["n"] = 3;
  EXPECT_EQ(Curl("POST", "/v1/chat/completions", bad.dump()).first, 400);
  bad = req;
  bad["model"] = "gpt-4";
  EXPECT_EQ(Curl("POST", "/v1/chat/completions", bad.dump()).first, 404);
  EXPECT_EQ(Curl("GET", "/v1/nothing", "").first, 404);
  const std::string huge(5 << 20, 'a');
  EXPECT_EQ(Curl("POST", "/v1/completions", json{{"prompt", huge}}.dump()).first, 413);
  EXPECT_EQ(Curl("POST", "/v1/chat/completions", req.dump(), "nope").first, 401);

  // The gRPC API wants the key too.
  auto stub = GatewayClient(mesh_->gateway_address());
  grpc::ClientContext ctx;
  WaitForReady(&ctx, absl::Seconds(60));  // the refusal must come from the gateway
  v1::ModelInfoResponse info;
  EXPECT_EQ(stub->ModelInfo(&ctx, v1::ModelInfoRequest(), &info).error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
}

// Sends a chat request for up to 4000 tokens whose client hangs up after half a second; returns
// how many tokens the gateway generated for it (counted when the request ends), or 0 when it
// did not end within 10 s. Also returns the metrics endpoint.
double OpenAiApiTest::TokensAfterClientLeaves(bool stream, std::string* metrics_port) {
  auto addr = MetricsAddressFromLog(mesh_->gateway().log);
  EXPECT_TRUE(addr.ok()) << addr.status();
  if (!addr.ok()) return 0;
  *metrics_port = *addr;
  auto completion_tokens = [&]() {
    auto text = ScrapeMetrics(*metrics_port);
    return text.ok() ? SumSamples(*text, "moemesh_tokens_total", {{"kind", "completion"}}) : -1.0;
  };
  const double before = completion_tokens();
  json req = {{"model", "tiny-moe"}, {"messages", Messages()}, {"max_tokens", 4000},
              {"temperature", 0},    {"ignore_eos", true},     {"stream", stream}};
  Curl("POST", "/v1/chat/completions", req.dump(), kKey, "--max-time 0.5", /*expect_ok=*/false);
  // The count appears when the request ends, then stops growing.
  double generated = 0, last = -1;
  for (int i = 0; i < 100 && !(generated > 0 && generated == last); ++i) {
    last = generated;
    absl::SleepFor(absl::Milliseconds(100));
    generated = completion_tokens() - before;
  }
  return generated;
}

TEST_F(OpenAiApiTest, ClientThatDisconnectsMidStreamIsCancelled) {
  const absl::Time start = absl::Now();
  std::string port;
  const double generated = TokensAfterClientLeaves(/*stream=*/true, &port);
  EXPECT_GT(generated, 0);
  EXPECT_LT(generated, 4000) << "the stream ran to its end although its client left";
  EXPECT_LT(absl::Now() - start, absl::Seconds(10));
  // The HTTP API counts requests by path and status.
  auto text = ScrapeMetrics(port);
  ASSERT_TRUE(text.ok());
  EXPECT_GE(SumSamples(*text, "moemesh_http_requests_total",
                       {{"path", "/v1/chat/completions"}, {"code", "200"}}),
            1);
}

// The same without streaming: nothing is written until the end, so the gateway watches the
// connection itself and cancels the request when its client hangs up.
TEST_F(OpenAiApiTest, ClientThatDisconnectsFromANonStreamingRequestIsCancelled) {
  const absl::Time start = absl::Now();
  std::string port;
  const double generated = TokensAfterClientLeaves(/*stream=*/false, &port);
  EXPECT_GT(generated, 0) << "the request did not end within 10 s of its client leaving";
  EXPECT_LT(generated, 4000) << "the request ran to its end although its client left";
  EXPECT_LT(absl::Now() - start, absl::Seconds(10));
}

}  // namespace
}  // namespace moemesh::testing
