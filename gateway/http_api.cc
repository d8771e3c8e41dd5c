#include "gateway/http_api.h"

#include <dirent.h>
#include <netdb.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <deque>
#include <optional>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "httplib.h"
#include "nlohmann/json.hpp"

namespace moemesh::gateway {
namespace {

// Watches the TCP connection a request came in on, so that a non-streaming request whose client
// has gone is cancelled instead of running to its end (streaming requests notice on their next
// write). cpp-httplib 0.11 does not expose the socket to handlers, so the connection is found
// once among the process's sockets by its two ends (the server's port; the peer's address and
// port, which httplib does give), and then peeked: a read of 0 bytes means the peer closed its
// side. When it cannot be found the request simply runs to its end, as before.
class PeerWatch {
 public:
  PeerWatch(const httplib::Request& req, int server_port) {
    if (req.remote_port < 0 || req.remote_addr.empty()) return;
    DIR* d = ::opendir("/proc/self/fd");
    if (d == nullptr) return;
    while (dirent* e = ::readdir(d)) {
      char* end = nullptr;
      const long fd = std::strtol(e->d_name, &end, 10);
      if (end == e->d_name || *end != '\0' || fd == ::dirfd(d)) continue;
      sockaddr_storage local{}, peer{};
      socklen_t ll = sizeof(local), pl = sizeof(peer);
      if (::getsockname(static_cast<int>(fd), reinterpret_cast<sockaddr*>(&local), &ll) != 0 ||
          ::getpeername(static_cast<int>(fd), reinterpret_cast<sockaddr*>(&peer), &pl) != 0) {
        continue;
      }
      char lport[16], paddr[NI_MAXHOST], pport[16];
      if (::getnameinfo(reinterpret_cast<sockaddr*>(&local), ll, nullptr, 0, lport, sizeof(lport),
                        NI_NUMERICSERV) != 0 ||
          ::getnameinfo(reinterpret_cast<sockaddr*>(&peer), pl, paddr, sizeof(paddr), pport,
                        sizeof(pport), NI_NUMERICHOST | NI_NUMERICSERV) != 0) {
        continue;
      }
      if (std::atoi(lport) == server_port && std::atoi(pport) == req.remote_port &&
          req.remote_addr == paddr) {
        fd_ = static_cast<int>(fd);
        break;
      }
    }
    ::closedir(d);
  }

  bool found() const { return fd_ >= 0; }

  // True once the peer has closed the connection (or it failed). Data waiting to be read
  // (a pipelined request, TLS records) counts as alive.
  bool Gone() const {
    if (fd_ < 0) return false;
    char b;
    const ssize_t n = ::recv(fd_, &b, 1, MSG_PEEK | MSG_DONTWAIT);
    if (n == 0) return true;
    return n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR;
  }

 private:
  int fd_ = -1;
};

using nlohmann::json;

constexpr const char* kJson = "application/json";

std::string Dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

// A request error in OpenAI's shape.
struct ApiError {
  int status = 400;
  std::string message;
  std::string param;  // the offending field, if any
  std::string code;
};

const char* ErrorType(int status) {
  switch (status) {
    case 400:
    case 404:
    case 413:
      return "invalid_request_error";
    case 401:
      return "authentication_error";
    case 429:
      return "rate_limit_error";
    case 503:
      return "service_unavailable";
    case 504:
      return "timeout";
    default:
      return "server_error";
  }
}

json ErrorBody(const ApiError& e) {
  return {{"error",
           {{"message", e.message},
            {"type", ErrorType(e.status)},
            {"param", e.param.empty() ? json(nullptr) : json(e.param)},
            {"code", e.code.empty() ? json(nullptr) : json(e.code)}}}};
}

void Send(httplib::Response& res, const ApiError& e) {
  res.status = e.status;
  res.set_content(Dump(ErrorBody(e)), kJson);
}

int HttpStatus(absl::StatusCode c) {
  switch (c) {
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kFailedPrecondition:
    case absl::StatusCode::kOutOfRange:
      return 400;
    case absl::StatusCode::kUnauthenticated:
      return 401;
    case absl::StatusCode::kNotFound:
      return 404;
    case absl::StatusCode::kResourceExhausted:
      return 429;
    case absl::StatusCode::kUnavailable:
    case absl::StatusCode::kCancelled:
      return 503;
    case absl::StatusCode::kDeadlineExceeded:
      return 504;
    default:
      return 500;
  }
}

ApiError FromStatus(const absl::Status& s) {
  return ApiError{HttpStatus(s.code()), std::string(s.message()), "", ""};
}

// Events from the scheduler's thread to the HTTP thread serving the request.
class EventQueue {
 public:
  void Push(TextEvent ev) {
    absl::MutexLock lock(&mu_);
    events_.push_back(std::move(ev));
  }
  // The next event, or nothing after `timeout`.
  std::optional<TextEvent> Pop(absl::Duration timeout) {
    absl::MutexLock lock(&mu_);
    auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return !events_.empty(); };
    mu_.AwaitWithTimeout(absl::Condition(&ready), timeout);
    if (events_.empty()) return std::nullopt;
    TextEvent ev = std::move(events_.front());
    events_.pop_front();
    return ev;
  }

 private:
  absl::Mutex mu_;
  std::deque<TextEvent> events_ ABSL_GUARDED_BY(mu_);
};

// Field readers: a missing or null field leaves the output as it is; a field of the wrong type
// is a 400 naming it.
std::optional<ApiError> Bad(const std::string& param, const std::string& message) {
  return ApiError{400, message, param, ""};
}

bool Has(const json& body, const char* key) {
  auto it = body.find(key);
  return it != body.end() && !it->is_null();
}

std::optional<ApiError> ReadBool(const json& body, const char* key, bool* out) {
  if (!Has(body, key)) return std::nullopt;
  if (!body[key].is_boolean()) return Bad(key, absl::StrCat("'", key, "' must be a boolean"));
  *out = body[key].get<bool>();
  return std::nullopt;
}

std::optional<ApiError> ReadInt(const json& body, const char* key, int64_t lo, int64_t hi,
                                std::optional<int64_t>* out) {
  if (!Has(body, key)) return std::nullopt;
  const json& v = body[key];
  if (!v.is_number_integer() || v.get<int64_t>() < lo || v.get<int64_t>() > hi)
    return Bad(key, absl::StrCat("'", key, "' must be an integer in [", lo, ", ", hi, "]"));
  *out = v.get<int64_t>();
  return std::nullopt;
}

std::optional<ApiError> ReadFloat(const json& body, const char* key, double lo, double hi,
                                  std::optional<float>* out) {
  if (!Has(body, key)) return std::nullopt;
  const json& v = body[key];
  if (!v.is_number() || v.get<double>() < lo || v.get<double>() > hi)
    return Bad(key, absl::StrCat("'", key, "' must be a number in [", lo, ", ", hi, "]"));
  *out = v.get<float>();
  return std::nullopt;
}

#define RETURN_API_ERROR(expr)                       \
  do {                                               \
    if (auto _e = (expr); _e) return *std::move(_e); \
  } while (0)

// What a completion request asks besides its input.
struct Common {
  bool stream = false;
  bool include_usage = false;
  bool echo = false;
  int logprobs = -1;
};

// The sampling and stopping fields both endpoints share.
std::optional<ApiError> ReadSampling(const json& body, bool chat, int max_model_len, TextRequest* r,
                                     Common* c) {
  std::optional<int64_t> n, max_tokens, top_k, seed;
  RETURN_API_ERROR(ReadInt(body, "n", 1, 1, &n));
  if (Has(body, "best_of") && body["best_of"] != 1)
    return Bad("best_of", "only best_of = 1 is supported");
  const char* max_key =
      chat && Has(body, "max_completion_tokens") ? "max_completion_tokens" : "max_tokens";
  RETURN_API_ERROR(ReadInt(body, max_key, 1, INT32_MAX, &max_tokens));
  r->max_tokens = static_cast<int>(max_tokens.value_or(std::max(1, max_model_len)));
  std::optional<float> temperature, top_p;
  RETURN_API_ERROR(ReadFloat(body, "temperature", 0, 100, &temperature));
  RETURN_API_ERROR(ReadFloat(body, "top_p", 0, 1, &top_p));
  RETURN_API_ERROR(ReadInt(body, "top_k", -1, INT32_MAX, &top_k));
  r->temperature = temperature;
  r->top_p = top_p;
  if (top_k) r->top_k = *top_k < 0 ? 0 : static_cast<int>(*top_k);
  if (Has(body, "seed")) {
    if (!body["seed"].is_number_integer()) return Bad("seed", "'seed' must be an integer");
    r->seed = static_cast<uint64_t>(body["seed"].get<int64_t>());
  }
  for (const char* key : {"presence_penalty", "frequency_penalty"}) {
    if (Has(body, key) && (!body[key].is_number() || body[key].get<double>() != 0.0))
      return Bad(key, absl::StrCat("'", key, "' is not supported (only 0)"));
  }
  if (Has(body, "logit_bias") && !(body["logit_bias"].is_object() && body["logit_bias"].empty()))
    return Bad("logit_bias", "'logit_bias' is not supported");
  if (Has(body, "stop")) {
    const json& s = body["stop"];
    if (s.is_string()) {
      r->stop.push_back(s.get<std::string>());
    } else if (s.is_array()) {
      for (const json& x : s) {
        if (!x.is_string()) return Bad("stop", "'stop' must be a string or a list of strings");
        r->stop.push_back(x.get<std::string>());
      }
    } else {
      return Bad("stop", "'stop' must be a string or a list of strings");
    }
  }
  RETURN_API_ERROR(ReadBool(body, "ignore_eos", &r->ignore_eos));
  RETURN_API_ERROR(ReadBool(body, "skip_special_tokens", &r->skip_special_tokens));
  RETURN_API_ERROR(ReadBool(body, "stream", &c->stream));
  if (Has(body, "stream_options")) {
    const json& so = body["stream_options"];
    if (!so.is_object()) return Bad("stream_options", "'stream_options' must be an object");
    if (!c->stream)
      return Bad("stream_options", "'stream_options' is only allowed when 'stream' is true");
    RETURN_API_ERROR(ReadBool(so, "include_usage", &c->include_usage));
  }
  if (chat) {
    bool logprobs = false;
    std::optional<int64_t> top;
    RETURN_API_ERROR(ReadBool(body, "logprobs", &logprobs));
    RETURN_API_ERROR(ReadInt(body, "top_logprobs", 0, 20, &top));
    if (top && !logprobs) return Bad("top_logprobs", "'top_logprobs' needs 'logprobs' to be true");
    if (logprobs) c->logprobs = static_cast<int>(top.value_or(0));
  } else {
    std::optional<int64_t> lp;
    RETURN_API_ERROR(ReadInt(body, "logprobs", 0, 20, &lp));
    if (lp) c->logprobs = static_cast<int>(*lp);
    RETURN_API_ERROR(ReadBool(body, "echo", &c->echo));
    if (Has(body, "suffix")) return Bad("suffix", "'suffix' is not supported");
  }
  r->logprobs = c->logprobs;
  return std::nullopt;
}

std::string NewId(const char* prefix) {
  static std::atomic<uint64_t> counter{0};
  const uint64_t n = counter.fetch_add(1);
  return absl::StrCat(prefix, absl::Hex(absl::ToUnixMicros(absl::Now()), absl::kZeroPad12),
                      absl::Hex(n, absl::kZeroPad8));
}

// The text of one token, for log-probability entries.
std::string TokenText(const TextModel& text, int32_t id) {
  if (text.tokenizer() == nullptr) return absl::StrCat("token_id:", id);
  return text.tokenizer()->Decode(std::vector<int32_t>{id}, /*skip_special_tokens=*/false);
}

json Bytes(const std::string& s) {
  json b = json::array();
  for (unsigned char c : s) b.push_back(static_cast<int>(c));
  return b;
}

// One token's entry in a chat completion's logprobs.content.
json ChatLogprob(const TextModel& text, const TextEvent& ev) {
  const std::string t = TokenText(text, ev.token);
  json top = json::array();
  for (const auto& [id, lp] : ev.top) {
    const std::string s = TokenText(text, id);
    top.push_back({{"token", s}, {"logprob", lp}, {"bytes", Bytes(s)}});
  }
  return {{"token", t}, {"logprob", ev.logprob}, {"bytes", Bytes(t)}, {"top_logprobs", top}};
}

// Legacy completions logprobs, accumulated.
struct CompletionLogprobs {
  json tokens = json::array(), token_logprobs = json::array(), top = json::array(),
       offsets = json::array();
  void Add(const TextModel& text, const TextEvent& ev, size_t offset) {
    tokens.push_back(TokenText(text, ev.token));
    token_logprobs.push_back(ev.logprob);
    json t = json::object();
    for (const auto& [id, lp] : ev.top) t[TokenText(text, id)] = lp;
    top.push_back(t);
    offsets.push_back(offset);
  }
  json ToJson() const {
    return {{"tokens", tokens},
            {"token_logprobs", token_logprobs},
            {"top_logprobs", top},
            {"text_offset", offsets}};
  }
};

json Usage(int64_t prompt, int64_t completion) {
  return {{"prompt_tokens", prompt},
          {"completion_tokens", completion},
          {"total_tokens", prompt + completion}};
}

std::string Sse(const json& j) { return absl::StrCat("data: ", Dump(j), "\n\n"); }

thread_local absl::Time t_request_start;

// A 404 when the body names a model other than the served one.
std::optional<ApiError> CheckModel(const json& body, const std::string& served) {
  if (!Has(body, "model")) return std::nullopt;
  if (!body["model"].is_string()) return Bad("model", "'model' must be a string");
  const std::string m = body["model"].get<std::string>();
  if (m != served)
    return ApiError{404, absl::StrCat("The model `", m, "` does not exist."), "model",
                    "model_not_found"};
  return std::nullopt;
}

// The bounded set of path labels for metrics.
std::string PathLabel(const std::string& path) {
  for (const char* p : {"/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize",
                        "/detokenize", "/health"}) {
    if (path == p) return p;
  }
  return "other";
}

}  // namespace

HttpApi::HttpApi(HttpApiOptions options, TextGenerator* generator, Metrics* metrics)
    : options_(std::move(options)),
      generator_(generator),
      metrics_(metrics),
      created_(absl::ToUnixSeconds(absl::Now())) {}

HttpApi::~HttpApi() { Stop(); }

void HttpApi::Stop() {
  if (server_) server_->stop();
  if (thread_.joinable()) thread_.join();
}

absl::StatusOr<std::unique_ptr<HttpApi>> HttpApi::Start(HttpApiOptions options,
                                                        TextGenerator* generator,
                                                        Metrics* metrics) {
  std::unique_ptr<HttpApi> api(new HttpApi(std::move(options), generator, metrics));
  const HttpApiOptions& o = api->options_;
  if (o.tls_cert.empty() != o.tls_key.empty())
    return absl::InvalidArgumentError("give both a TLS certificate and its key, or neither");
  if (!o.tls_cert.empty()) {
    auto ssl = std::make_unique<httplib::SSLServer>(o.tls_cert.c_str(), o.tls_key.c_str(),
                                                    o.tls_ca.empty() ? nullptr : o.tls_ca.c_str());
    if (!ssl->is_valid())
      return absl::InvalidArgumentError(
          absl::StrCat("cannot use the HTTPS certificate ", o.tls_cert, " with key ", o.tls_key,
                       o.tls_ca.empty() ? "" : absl::StrCat(" and CA ", o.tls_ca)));
    api->server_ = std::move(ssl);
  } else {
    api->server_ = std::make_unique<httplib::Server>();
  }
  const int threads = std::max(1, o.threads);
  api->server_->new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
  api->server_->set_payload_max_length(o.max_body_bytes);
  api->server_->set_read_timeout(30, 0);
  api->server_->set_write_timeout(30, 0);
  api->Routes();
  const int port = o.port == 0 ? api->server_->bind_to_any_port(o.host)
                               : (api->server_->bind_to_port(o.host, o.port) ? o.port : -1);
  if (port <= 0)
    return absl::UnavailableError(absl::StrCat("cannot listen for HTTP on ", o.host, ":", o.port));
  api->port_ = port;
  httplib::Server* server = api->server_.get();
  api->thread_ = std::thread([server] { server->listen_after_bind(); });
  return api;
}

void HttpApi::Routes() {
  httplib::Server& s = *server_;
  const TextModel& text = generator_->text();

  s.set_pre_routing_handler([this](const httplib::Request& req, httplib::Response& res) {
    t_request_start = absl::Now();
    if (req.path == "/health" || req.path == "/metrics")
      return httplib::Server::HandlerResponse::Unhandled;
    if (options_.keys != nullptr && !options_.keys->Check(req.get_header_value("Authorization"))) {
      Send(res, ApiError{401, "Incorrect or missing API key; send 'Authorization: Bearer KEY'", "",
                         "invalid_api_key"});
      return httplib::Server::HandlerResponse::Handled;
    }
    return httplib::Server::HandlerResponse::Unhandled;
  });
  s.set_error_handler([](const httplib::Request& req, httplib::Response& res) {
    if (!res.body.empty()) return;
    if (res.status == 404) {
      Send(res, ApiError{404, absl::StrCat("no route for ", req.method, " ", req.path), "", ""});
    } else if (res.status == 413) {
      Send(res, ApiError{413, "the request body is over the size limit", "", ""});
    } else {
      Send(res, ApiError{res.status, absl::StrCat("HTTP ", res.status), "", ""});
    }
  });
  s.set_exception_handler([](const httplib::Request&, httplib::Response& res, std::exception_ptr) {
    Send(res, ApiError{500, "internal error", "", ""});
  });
  s.set_logger([this](const httplib::Request& req, const httplib::Response& res) {
    const std::string label = PathLabel(req.path);
    metrics_->CountHttpRequest(label, res.status);
    metrics_->ObserveHttpLatency(label, absl::ToDoubleSeconds(absl::Now() - t_request_start));
  });

  s.Get("/health", [this](const httplib::Request&, httplib::Response& res) {
    const bool ok = !draining_.load() && (!options_.healthy || options_.healthy());
    res.status = ok ? 200 : 503;
    res.set_content(ok ? "{\"status\":\"ok\"}" : "{\"status\":\"unavailable\"}", kJson);
  });

  s.Get("/v1/models", [this](const httplib::Request&, httplib::Response& res) {
    json m = {{"id", options_.served_model_name},
              {"object", "model"},
              {"created", created_},
              {"owned_by", "moemesh"},
              {"max_model_len", options_.max_model_len}};
    res.set_content(Dump({{"object", "list"}, {"data", json::array({m})}}), kJson);
  });

  s.Post("/tokenize", [this, &text](const httplib::Request& req, httplib::Response& res) {
    json body = json::parse(req.body, nullptr, false);
    if (body.is_discarded() || !body.is_object())
      return Send(res, ApiError{400, "the body must be a JSON object", "", ""});
    if (auto e = CheckModel(body, options_.served_model_name)) return Send(res, *e);
    absl::StatusOr<std::vector<int32_t>> ids;
    if (Has(body, "messages")) {
      bool gen = true, special = false;
      if (auto e = ReadBool(body, "add_generation_prompt", &gen)) return Send(res, *e);
      if (auto e = ReadBool(body, "add_special_tokens", &special)) return Send(res, *e);
      // Members keep their order, as in Hugging Face's dicts (tojson shows it).
      const auto ordered = nlohmann::ordered_json::parse(req.body, nullptr, false);
      absl::StatusOr<std::string> rendered =
          text.RenderChat(ordered["messages"], gen,
                          Has(body, "tools") ? ordered["tools"] : nlohmann::ordered_json(nullptr));
      if (!rendered.ok()) return Send(res, FromStatus(rendered.status()));
      ids = text.Encode(*rendered, special);
    } else if (Has(body, "prompt") && body["prompt"].is_string()) {
      bool special = true;
      if (auto e = ReadBool(body, "add_special_tokens", &special)) return Send(res, *e);
      ids = text.Encode(body["prompt"].get<std::string>(), special);
    } else {
      return Send(res, ApiError{400, "give 'prompt' (a string) or 'messages'", "prompt", ""});
    }
    if (!ids.ok()) return Send(res, FromStatus(ids.status()));
    res.set_content(
        Dump({{"count", ids->size()}, {"max_model_len", options_.max_model_len}, {"tokens", *ids}}),
        kJson);
  });

  s.Post("/detokenize", [this, &text](const httplib::Request& req, httplib::Response& res) {
    json body = json::parse(req.body, nullptr, false);
    if (body.is_discarded() || !body.is_object())
      return Send(res, ApiError{400, "the body must be a JSON object", "", ""});
    if (auto e = CheckModel(body, options_.served_model_name)) return Send(res, *e);
    if (!Has(body, "tokens") || !body["tokens"].is_array())
      return Send(res, ApiError{400, "'tokens' must be a list of token ids", "tokens", ""});
    std::vector<int32_t> ids;
    for (const json& t : body["tokens"]) {
      if (!t.is_number_integer() || t.get<int64_t>() < 0 || t.get<int64_t>() > INT32_MAX)
        return Send(res, ApiError{400, "'tokens' must be a list of token ids", "tokens", ""});
      ids.push_back(t.get<int32_t>());
    }
    absl::StatusOr<std::string> out = text.Decode(ids);
    if (!out.ok()) return Send(res, FromStatus(out.status()));
    res.set_content(Dump({{"prompt", *out}}), kJson);
  });

  s.Post("/v1/chat/completions", [this](const httplib::Request& req, httplib::Response& res) {
    Complete(req, res, /*chat=*/true);
  });
  s.Post("/v1/completions", [this](const httplib::Request& req, httplib::Response& res) {
    Complete(req, res, /*chat=*/false);
  });
}

void HttpApi::Complete(const httplib::Request& req, httplib::Response& res, bool chat) {
  if (draining_.load())
    return Send(res, ApiError{503, "the gateway is draining; retry on another", "", ""});
  json body = json::parse(req.body, nullptr, false);
  if (body.is_discarded() || !body.is_object())
    return Send(res, ApiError{400, "the body must be a JSON object", "", ""});
  if (auto e = CheckModel(body, options_.served_model_name)) return Send(res, *e);
  const TextModel& text = generator_->text();
  TextRequest r;
  r.api = "http";
  Common c;
  if (chat) {
    if (!Has(body, "messages"))
      return Send(res, ApiError{400, "'messages' is required", "messages", ""});
    // Members keep their order, as in Hugging Face's dicts (tojson shows it).
    const auto ordered = nlohmann::ordered_json::parse(req.body, nullptr, false);
    absl::StatusOr<nlohmann::ordered_json> msgs = NormaliseChatMessages(ordered["messages"]);
    if (!msgs.ok())
      return Send(res, ApiError{400, std::string(msgs.status().message()), "messages", ""});
    r.input = TextRequest::Input::kChat;
    r.messages = *std::move(msgs);
    if (Has(body, "tools")) {
      if (!body["tools"].is_array())
        return Send(res, ApiError{400, "'tools' must be a list", "tools", ""});
      r.tools = ordered["tools"];
    }
    if (Has(body, "response_format") && !(body["response_format"].is_object() &&
                                          body["response_format"].value("type", "") == "text"))
      return Send(res, ApiError{400, "only response_format {\"type\": \"text\"} is supported",
                                "response_format", ""});
  } else {
    if (!Has(body, "prompt")) return Send(res, ApiError{400, "'prompt' is required", "prompt", ""});
    const json& p = body["prompt"];
    if (p.is_string()) {
      r.input = TextRequest::Input::kText;
      r.prompt = p.get<std::string>();
    } else if (p.is_array() && p.size() == 1 && p[0].is_string()) {
      r.input = TextRequest::Input::kText;
      r.prompt = p[0].get<std::string>();
    } else if (p.is_array() && !p.empty() && p[0].is_number_integer()) {
      r.input = TextRequest::Input::kIds;
      for (const json& t : p) {
        if (!t.is_number_integer() || t.get<int64_t>() < 0 || t.get<int64_t>() > INT32_MAX)
          return Send(res, ApiError{400, "'prompt' as a list must hold token ids", "prompt", ""});
        r.prompt_ids.push_back(t.get<int32_t>());
      }
    } else {
      return Send(
          res, ApiError{400, "'prompt' must be a string or a list of token ids (one prompt: n = 1)",
                        "prompt", ""});
    }
  }
  if (auto e = ReadSampling(body, chat, options_.max_model_len, &r, &c)) return Send(res, *e);

  auto cancel = std::make_shared<CancelFlag>();
  r.cancel = cancel;
  auto queue = std::make_shared<EventQueue>();
  const TextRequest::Input input = r.input;
  const std::string prompt_text = r.prompt;
  if (absl::Status s =
          generator_->Start(std::move(r), [queue](TextEvent ev) { queue->Push(std::move(ev)); });
      !s.ok()) {
    return Send(res, FromStatus(s));
  }
  // The first event tells whether the request was accepted: errors before generation keep
  // their HTTP status instead of becoming part of a stream.
  std::optional<TextEvent> first;
  while (!(first = queue->Pop(absl::Milliseconds(100)))) {
  }
  if (first->done && !first->status.ok()) return Send(res, FromStatus(first->status));
  const std::string id = NewId(chat ? "chatcmpl-" : "cmpl-");
  const int64_t created = absl::ToUnixSeconds(absl::Now());
  const std::string model = options_.served_model_name;
  std::string echo;
  if (c.echo) {
    if (input == TextRequest::Input::kText) {
      echo = prompt_text;
    } else if (auto d = text.Decode(first->prompt_ids); d.ok()) {
      echo = *d;
    }
  }

  if (!c.stream) {
    std::string out = echo;
    json chat_lp = json::array();
    CompletionLogprobs comp_lp;
    TextEvent ev = *std::move(first);
    const PeerWatch peer(req, port_);
    bool peer_gone = false;
    absl::Time next_check = absl::Now();
    while (true) {
      if (!ev.done && c.logprobs >= 0) {
        if (chat) {
          chat_lp.push_back(ChatLogprob(text, ev));
        } else {
          comp_lp.Add(text, ev, out.size());
        }
      }
      out += ev.text;
      if (ev.done) break;
      // The client left: stop generating for nobody (the scheduler frees the request's
      // blocks at its next step) and wait for the request's end. Checked every 100 ms, whether
      // tokens keep coming or not.
      std::optional<TextEvent> next;
      while (true) {
        if (!peer_gone && absl::Now() >= next_check) {
          next_check = absl::Now() + absl::Milliseconds(100);
          if (peer.Gone()) {
            peer_gone = true;
            cancel->Cancel();
          }
        }
        if ((next = queue->Pop(absl::Milliseconds(100)))) break;
      }
      ev = *std::move(next);
    }
    if (!ev.status.ok()) return Send(res, FromStatus(ev.status));
    const std::string finish = ev.finish_reason == "stop" ? "stop" : "length";
    json choice;
    if (chat) {
      choice = {{"index", 0},
                {"message", {{"role", "assistant"}, {"content", out}}},
                {"logprobs", c.logprobs >= 0 ? json{{"content", chat_lp}} : json(nullptr)},
                {"finish_reason", finish}};
      if (!ev.matched_stop.empty()) choice["stop_reason"] = ev.matched_stop;
    } else {
      choice = {{"index", 0},
                {"text", out},
                {"logprobs", c.logprobs >= 0 ? comp_lp.ToJson() : json(nullptr)},
                {"finish_reason", finish}};
      if (!ev.matched_stop.empty()) choice["stop_reason"] = ev.matched_stop;
    }
    json resp = {{"id", id},
                 {"object", chat ? "chat.completion" : "text_completion"},
                 {"created", created},
                 {"model", model},
                 {"choices", json::array({choice})},
                 {"usage", Usage(ev.prompt_tokens, ev.completion_tokens)}};
    res.set_content(Dump(resp), kJson);
    return;
  }

  // Streaming: one chunk per piece of text, then the finish chunk, usage if asked, [DONE].
  struct Stream {
    std::optional<TextEvent> pending;
    bool sent_role = false;
    bool ended = false;
    size_t offset = 0;
  };
  auto st = std::make_shared<Stream>();
  st->pending = std::move(first);
  const bool include_usage = c.include_usage;
  const int logprobs = c.logprobs;
  res.set_header("Cache-Control", "no-cache");
  res.set_chunked_content_provider(
      "text/event-stream",
      [this, st, queue, cancel, chat, id, created, model, include_usage, logprobs, echo, &text](
          size_t, httplib::DataSink& sink) {
        auto chunk = [&](json choice, bool with_usage_null) {
          json j = {{"id", id},
                    {"object", chat ? "chat.completion.chunk" : "text_completion"},
                    {"created", created},
                    {"model", model},
                    {"choices", json::array({std::move(choice)})}};
          if (include_usage && with_usage_null) j["usage"] = nullptr;
          const std::string s = Sse(j);
          return sink.write(s.data(), s.size());
        };
        if (st->ended) return false;
        if (!st->sent_role) {
          st->sent_role = true;
          bool ok = true;
          if (chat) {
            ok = chunk({{"index", 0},
                        {"delta", {{"role", "assistant"}, {"content", ""}}},
                        {"logprobs", nullptr},
                        {"finish_reason", nullptr}},
                       true);
          } else if (!echo.empty()) {
            ok = chunk(
                {{"index", 0}, {"text", echo}, {"logprobs", nullptr}, {"finish_reason", nullptr}},
                true);
            st->offset = echo.size();
          }
          if (!ok) {
            cancel->Cancel();
            return false;
          }
        }
        // Wait for the next event, noticing a client that went away.
        std::optional<TextEvent> ev = std::move(st->pending);
        st->pending.reset();
        while (!ev) {
          ev = queue->Pop(absl::Milliseconds(50));
          if (!ev && !sink.is_writable()) {
            cancel->Cancel();
            return false;
          }
        }
        if (ev->done && !ev->status.ok()) {
          const std::string s = Sse(ErrorBody(FromStatus(ev->status)));
          sink.write(s.data(), s.size());
          const std::string done = "data: [DONE]\n\n";
          sink.write(done.data(), done.size());
          st->ended = true;
          sink.done();
          return true;
        }
        json lp = nullptr;
        if (!ev->done && logprobs >= 0) {
          if (chat) {
            lp = {{"content", json::array({ChatLogprob(text, *ev)})}};
          } else {
            CompletionLogprobs c1;
            c1.Add(text, *ev, st->offset);
            lp = c1.ToJson();
          }
        }
        bool ok = true;
        if (!ev->text.empty() || !lp.is_null()) {
          if (chat) {
            ok = chunk({{"index", 0},
                        {"delta", {{"content", ev->text}}},
                        {"logprobs", lp},
                        {"finish_reason", nullptr}},
                       true);
          } else {
            ok = chunk(
                {{"index", 0}, {"text", ev->text}, {"logprobs", lp}, {"finish_reason", nullptr}},
                true);
          }
          st->offset += ev->text.size();
        }
        if (ok && ev->done) {
          const std::string finish = ev->finish_reason == "stop" ? "stop" : "length";
          json fin = chat ? json{{"index", 0},
                                 {"delta", json::object()},
                                 {"logprobs", nullptr},
                                 {"finish_reason", finish}}
                          : json{{"index", 0},
                                 {"text", ""},
                                 {"logprobs", nullptr},
                                 {"finish_reason", finish}};
          if (!ev->matched_stop.empty()) fin["stop_reason"] = ev->matched_stop;
          ok = chunk(fin, true);
          if (ok && include_usage) {
            json u = {{"id", id},
                      {"object", chat ? "chat.completion.chunk" : "text_completion"},
                      {"created", created},
                      {"model", model},
                      {"choices", json::array()},
                      {"usage", Usage(ev->prompt_tokens, ev->completion_tokens)}};
            const std::string s = Sse(u);
            ok = sink.write(s.data(), s.size());
          }
          if (ok) {
            const std::string done = "data: [DONE]\n\n";
            ok = sink.write(done.data(), done.size());
          }
          st->ended = true;
          if (ok) sink.done();
          return ok;
        }
        if (!ok) {
          cancel->Cancel();
          return false;
        }
        return true;
      },
      [cancel](bool success) {
        if (!success) cancel->Cancel();
      });
}

}  // namespace moemesh::gateway
