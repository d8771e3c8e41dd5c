// HttpApi: the gateway's OpenAI-compatible HTTP/1.1 API, served next to the gRPC port.
//
//   POST /v1/chat/completions   chat, rendered with the model's chat template
//   POST /v1/completions        a text prompt or token ids
//   GET  /v1/models             the served model
//   POST /tokenize, /detokenize vLLM's shapes
//   GET  /health                200 only while the gateway and the router it needs serve
//
// Request and response shapes follow OpenAI's API reference (streaming as text/event-stream
// chunks ending with `data: [DONE]`); errors are {"error":{"message","type","param","code"}}
// with 400 (bad parameters, template errors), 401 (missing or wrong key), 404 (unknown model
// or path), 413 (body over the limit), 429 (admission limits), 503 (draining, router down).
// Requests go through the same TextGenerator and Scheduler as gRPC's, so both batch together
// under the same limits. A streaming client that disconnects cancels its request.
//
// cpp-httplib serves it (the HTTP library llama.cpp's server uses), with its own threads; a
// streaming request holds one of them until it ends. Thread-safe; Stop() before destruction.
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "gateway/api_keys.h"
#include "gateway/text_generator.h"
#include "nlohmann/json.hpp"
#include "services/metrics/metrics.h"
#include "services/model/config.h"

namespace httplib {
class Server;
struct Request;
struct Response;
}  // namespace httplib

namespace moemesh::gateway {

struct HttpApiOptions {
  std::string host = "127.0.0.1";
  int port = 0;  // 0 picks a free port
  std::string served_model_name;
  size_t max_body_bytes = size_t{4} << 20;
  int threads = 64;  // concurrent HTTP requests (a streaming one holds a thread)
  // HTTPS when both are set; with tls_ca, clients must present a certificate it signed.
  std::string tls_cert, tls_key, tls_ca;
  const ApiKeys* keys = nullptr;  // may be null: no keys
  int max_model_len = 0;          // reported by /v1/models and /tokenize
  int default_max_tokens = 256;   // when a request gives none (bounded by the context)
  // True while the gateway and its router serve; /health answers 503 otherwise.
  std::function<bool()> healthy;
};

class HttpApi {
 public:
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<HttpApi>> Start(HttpApiOptions options,
                                                                      TextGenerator* generator,
                                                                      Metrics* metrics);
  ~HttpApi();
  int port() const { return port_; }
  // New completion requests get 503 and /health turns 503 (the first step of a drain).
  void SetDraining() { draining_.store(true); }
  // Stops accepting and joins the server thread; requests in flight end with their streams.
  void Stop();

 private:
  HttpApi(HttpApiOptions options, TextGenerator* generator, Metrics* metrics);
  void Routes();
  void Complete(const httplib::Request& req, httplib::Response& res, bool chat);

  HttpApiOptions options_;
  TextGenerator* generator_;
  Metrics* metrics_;
  std::unique_ptr<httplib::Server> server_;
  std::thread thread_;
  int port_ = 0;
  std::atomic<bool> draining_{false};
  const int64_t created_;
};

}  // namespace moemesh::gateway
