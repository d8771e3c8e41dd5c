// Client side of `moemesh generate/score --gateway` and the `moemesh up` launcher.
#include <poll.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "grpcpp/grpcpp.h"
#include "moemesh/v1/gateway.grpc.pb.h"
#include "nlohmann/json.hpp"
#include "services/common/status_macros.h"
#include "services/mesh/launcher.h"
#include "services/model/generator.h"
#include "services/rpc/server_host.h"
#include "services/rpc/tensor_proto.h"
#include "services/rpc/tls.h"
#include "tools/cli/commands.h"

namespace moemesh::cli {
namespace {

std::unique_ptr<v1::Gateway::Stub> GatewayStub(const std::string& address) {
  return v1::Gateway::NewStub(MakeChannel(address));
}

void SetDeadline(const Common& c, grpc::ClientContext* ctx) {
  if (c.timeout_s > 0)
    ctx->set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(c.timeout_s)));
}

}  // namespace

namespace {

void ToProtoChat(const nlohmann::ordered_json& messages, v1::Chat* chat) {
  for (const nlohmann::ordered_json& m : messages) {
    v1::ChatMessage* pm = chat->add_messages();
    pm->set_role(m.value("role", ""));
    if (m.contains("content") && m["content"].is_string())
      pm->set_content(m["content"].get<std::string>());
  }
}

}  // namespace

absl::StatusOr<std::string> GenerateViaGateway(const Common& c, const GenerateArgs& a) {
  auto stub = GatewayStub(c.gateway);
  grpc::ClientContext ctx;
  SetDeadline(c, &ctx);
  v1::GenerateRequest req;
  const bool text_mode = a.tokens.empty();
  if (!a.tokens.empty()) {
    req.mutable_prompt_tokens()->mutable_ids()->Add(a.tokens.begin(), a.tokens.end());
  } else if (!a.messages.is_null()) {
    ToProtoChat(a.messages, req.mutable_chat());
  } else {
    if (a.prompt.empty())
      return absl::InvalidArgumentError("give --prompt TEXT, --chat FILE or --tokens 1,2,3");
    req.set_prompt(a.prompt);
  }
  req.set_max_tokens(a.max_tokens);
  if (a.temperature_set) req.mutable_sampling()->set_temperature(a.sampling.temperature);
  if (a.top_k_set) req.mutable_sampling()->set_top_k(a.sampling.top_k);
  if (a.top_p_set) req.mutable_sampling()->set_top_p(a.sampling.top_p);
  req.mutable_sampling()->set_seed(a.sampling.seed);
  for (const std::string& s : a.stop) req.add_stop(s);
  req.set_ignore_eos(a.ignore_eos);
  const absl::Time start = absl::Now();
  absl::Time first = start;
  auto reader = stub->Generate(&ctx, req);
  v1::GenerateResponse resp;
  int64_t n = 0, received = 0;
  v1::Usage usage;
  std::string finish, text;
  while (reader->Read(&resp)) {
    if (received == 0 && resp.token_ids_size() > 0) first = absl::Now();
    received += resp.token_ids_size();
    text += resp.text();
    if (text_mode) {
      std::cout << resp.text();
    } else {
      for (int32_t t : resp.token_ids()) std::cout << (n++ > 0 ? "," : "") << t;
    }
    std::cout.flush();
    usage = resp.usage();
    if (resp.finish_reason() != v1::FINISH_REASON_UNSPECIFIED)
      finish = v1::FinishReason_Name(resp.finish_reason());
  }
  std::cout << std::endl;
  RETURN_IF_ERROR(FromGrpcStatus(reader->Finish()));
  const double decode_s = absl::ToDoubleSeconds(absl::Now() - first);
  std::fprintf(stderr,
               "[%lld prompt tokens, %lld generated, %s, first token %.3f s, %.1f tokens/s]\n",
               static_cast<long long>(usage.prompt_tokens()),
               static_cast<long long>(usage.completion_tokens()), finish.c_str(),
               absl::ToDoubleSeconds(first - start),
               received > 1 ? (received - 1) / std::max(1e-9, decode_s) : 0.0);
  return text;
}

absl::Status TokenizeViaGateway(const Common& c, const TokenizeArgs& a) {
  auto stub = GatewayStub(c.gateway);
  grpc::ClientContext ctx;
  SetDeadline(c, &ctx);
  v1::TokenizeRequest req;
  if (!a.messages.is_null()) {
    ToProtoChat(a.messages, req.mutable_chat());
  } else {
    req.set_text(a.prompt);
    req.set_add_special_tokens(a.add_special_tokens);
  }
  v1::TokenizeResponse resp;
  RETURN_IF_ERROR(FromGrpcStatus(stub->Tokenize(&ctx, req, &resp)));
  std::vector<int32_t> ids(resp.ids().begin(), resp.ids().end());
  std::cout << nlohmann::json{{"ids", ids}}.dump() << "\n";
  return absl::OkStatus();
}

absl::Status DetokenizeViaGateway(const Common& c, const std::vector<int32_t>& ids,
                                  bool skip_special_tokens) {
  auto stub = GatewayStub(c.gateway);
  grpc::ClientContext ctx;
  SetDeadline(c, &ctx);
  v1::DetokenizeRequest req;
  req.mutable_ids()->Add(ids.begin(), ids.end());
  req.set_skip_special_tokens(skip_special_tokens);
  v1::DetokenizeResponse resp;
  RETURN_IF_ERROR(FromGrpcStatus(stub->Detokenize(&ctx, req, &resp)));
  std::cout << nlohmann::json{{"text", resp.text()}}.dump(-1, ' ', false,
                                                          nlohmann::json::error_handler_t::replace)
            << "\n";
  return absl::OkStatus();
}

absl::Status ScoreViaGateway(const Common& c, const std::vector<int32_t>& tokens, bool logprobs,
                             int top_logprobs) {
  auto stub = GatewayStub(c.gateway);
  grpc::ClientContext ctx;
  SetDeadline(c, &ctx);
  v1::ScoreRequest req;
  req.mutable_tokens()->Add(tokens.begin(), tokens.end());
  req.set_log_probs(logprobs);
  if (top_logprobs > 0) {
    req.set_top_log_probs(top_logprobs);
    req.set_token_log_probs(true);
    req.set_omit_logits(true);
  }
  v1::ScoreResponse resp;
  RETURN_IF_ERROR(FromGrpcStatus(stub->Score(&ctx, req, &resp)));
  if (top_logprobs > 0) {
    std::vector<std::vector<int32_t>> ids;
    std::vector<std::vector<float>> lps;
    for (const auto& t : resp.top()) {
      ids.emplace_back(t.ids().begin(), t.ids().end());
      lps.emplace_back(t.log_probs().begin(), t.log_probs().end());
    }
    PrintTopLogProbs(
        tokens, ids, lps,
        std::vector<float>(resp.token_log_probs().begin(), resp.token_log_probs().end()));
    return absl::OkStatus();
  }
  ASSIGN_OR_RETURN(Tensor logits, TensorFromProto(resp.logits(), "logits", 2));
  nlohmann::json j;
  j["tokens"] = tokens;
  nlohmann::json rows = nlohmann::json::array();
  for (int64_t r = 0; r < logits.dim(0); ++r) {
    rows.push_back(std::vector<float>(logits.row(r), logits.row(r) + logits.dim(1)));
  }
  j[logprobs ? "logprobs" : "logits"] = rows;
  std::cout << j.dump() << "\n";
  return absl::OkStatus();
}

absl::Status Up(const Common& c, const UpArgs& a) {
  BlockShutdownSignals();
  MeshOptions o;
  o.bin_dir = a.bin_dir;
  o.model = c.model;
  if (o.model.empty()) {
    o.model = a.default_model_dir;
    struct stat st;
    if (::stat((o.model + "/config.json").c_str(), &st) != 0) {
      std::fprintf(stderr, "moemesh up: creating the default model in %s\n", o.model.c_str());
      std::string parent = o.model.substr(0, o.model.rfind('/'));
      std::string path;
      for (size_t i = 1; i <= parent.size(); ++i) {
        if (i == parent.size() || parent[i] == '/') ::mkdir(parent.substr(0, i).c_str(), 0755);
      }
      GeneratorOptions g;
      g.config = SmallMixtralConfig(512, 256, 512, 4, 8, 2, 8, 2);
      g.seed = 7;
      RETURN_IF_ERROR(GenerateModel(g, o.model));
    }
  }
  o.groups = a.groups;
  o.replicas = a.replicas;
  o.top_k = c.top_k;
  o.wire_dtype = a.wire_dtype;
  if (a.worker_backend != "cpu" && a.worker_backend != "cuda") {
    return absl::InvalidArgumentError(
        absl::StrCat("--worker_backend must be cpu or cuda, got '", a.worker_backend, "'"));
  }
  o.worker_args.push_back("--backend=" + a.worker_backend);
  o.shared_experts_in_gateway = a.shared_in_gateway;
  o.metrics = true;
  if (a.kv_cache_bytes >= 0) {
    o.gateway_args.push_back(absl::StrCat("--kv_cache_bytes=", a.kv_cache_bytes));
  }
  if (!a.kv_cache_dtype.empty()) {
    o.gateway_args.push_back(absl::StrCat("--kv_cache_dtype=", a.kv_cache_dtype));
  }
  o.micro_batches = a.micro_batches;
  o.added_latency = absl::Microseconds(a.added_latency_us);
  o.gateway_cpus = a.gateway_cpus;
  o.worker_cpus = a.worker_cpus;
  o.work_dir = absl::StrCat(a.run_dir, "/moemesh-up-", ::getpid());
  const std::string http_port_file = o.work_dir + "/gateway.http_port";
  if (a.http_port >= 0) {
    o.gateway_args.push_back(absl::StrCat("--http_port=", a.http_port));
    o.gateway_args.push_back(absl::StrCat("--http_port_file=", http_port_file));
  }
  if (!a.api_key_file.empty()) o.gateway_args.push_back("--api_key_file=" + a.api_key_file);
  if (!a.chat_template.empty()) o.gateway_args.push_back("--chat_template=" + a.chat_template);
  if (a.tls) {
    const std::string dir = o.work_dir + "/tls";
    RETURN_IF_ERROR(MakeLocalCertificates(dir));
    o.tls = {dir + "/node.crt", dir + "/node.key", dir + "/ca.crt"};
    std::fprintf(stderr,
                 "moemesh up: mTLS with a throwaway CA in %s; clients need --tls_cert %s "
                 "--tls_key %s --tls_ca %s (HTTPS: curl --cacert %s)\n",
                 dir.c_str(), o.tls.cert.c_str(), o.tls.key.c_str(), o.tls.ca.c_str(),
                 o.tls.ca.c_str());
  }
  std::fprintf(
      stderr,
      "moemesh up: starting %d expert group(s) x %d replica(s), router and gateway (logs in %s)\n",
      a.groups, a.replicas, o.work_dir.c_str());
  ASSIGN_OR_RETURN(auto mesh, Mesh::Start(o));
  std::printf("gateway listening on %s\n", mesh->gateway_address().c_str());
  if (a.http_port >= 0) {
    std::string port;
    for (int i = 0; i < 200 && port.empty(); ++i) {
      std::ifstream in(http_port_file);
      if (!(in >> port)) {
        port.clear();
        absl::SleepFor(absl::Milliseconds(50));
      }
    }
    std::printf("OpenAI-compatible API on %s://127.0.0.1:%s/v1\n", a.tls ? "https" : "http",
                port.c_str());
  }
  std::fflush(stdout);
  if (!a.address_file.empty()) {
    std::ofstream(a.address_file + ".tmp") << mesh->gateway_address() << "\n";
    std::rename((a.address_file + ".tmp").c_str(), a.address_file.c_str());
  }
  // Wait for Ctrl-C / SIGTERM, reporting any service that dies meanwhile.
  while (true) {
    pollfd pfd{ShutdownSignalFd(), POLLIN, 0};
    if (::poll(&pfd, 1, 200) > 0) break;
    for (const std::string& name : mesh->Reap()) {
      std::fprintf(stderr, "moemesh up: %s exited (log in %s)\n", name.c_str(), o.work_dir.c_str());
    }
  }
  std::fprintf(stderr, "moemesh up: stopping\n");
  return mesh->Stop();
}

}  // namespace moemesh::cli
