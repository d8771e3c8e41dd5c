// Reading a mesh service's Prometheus /metrics from a test: finds the port the service
// printed in its log ("metrics on HOST:PORT"), fetches the text exposition with a plain
// HTTP/1.0 GET over a loopback socket, and sums samples by name and labels.
//
//   auto port = MetricsAddressFromLog(mesh->gateway().log);       // needs MeshOptions.metrics
//   auto text = ScrapeMetrics(*port);
//   double steps = SumSamples(*text, "moemesh_step_tokens_count");
//   double ok = SumSamples(*text, "moemesh_requests_total", {{"method", "Forward"}, {"code",
//   "OK"}});
//
// Header-only so that any test under tests/ can include it without a build change. Every
// call is bounded (socket timeouts); nothing here aborts.
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <iterator>
#include <map>
#include <sstream>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace moemesh::testing {

// The "HOST:PORT" a service printed after "metrics on " in its log file.
inline absl::StatusOr<std::string> MetricsAddressFromLog(const std::string& log_path) {
  std::ifstream in(log_path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", log_path));
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const std::string key = "metrics on ";
  const size_t at = text.find(key);
  if (at == std::string::npos) {
    return absl::NotFoundError(absl::StrCat(log_path, " does not say where its metrics are"));
  }
  const size_t begin = at + key.size();
  const size_t end = text.find_first_of(" \t\r\n", begin);
  return text.substr(begin, end == std::string::npos ? std::string::npos : end - begin);
}

// GET http://127.0.0.1:PORT/metrics (`address` is "127.0.0.1:PORT"); returns the body.
inline absl::StatusOr<std::string> ScrapeMetrics(const std::string& address) {
  const size_t colon = address.rfind(':');
  int port = 0;
  if (colon == std::string::npos ||
      !absl::SimpleAtoi(absl::string_view(address).substr(colon + 1), &port)) {
    return absl::InvalidArgumentError(absl::StrCat("bad metrics address ", address));
  }
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return absl::InternalError("socket() failed");
  struct timeval tv = {5, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  sockaddr_in sa = {};
  sa.sin_family = AF_INET;
  sa.sin_port = htons(static_cast<uint16_t>(port));
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) != 0) {
    ::close(fd);
    return absl::UnavailableError(absl::StrCat("cannot connect to ", address));
  }
  const std::string req = "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
  for (size_t sent = 0; sent < req.size();) {
    const ssize_t n = ::send(fd, req.data() + sent, req.size() - sent, MSG_NOSIGNAL);
    if (n <= 0) {
      ::close(fd);
      return absl::UnavailableError(absl::StrCat("cannot send to ", address));
    }
    sent += static_cast<size_t>(n);
  }
  std::string resp;
  char buf[16384];
  while (true) {
    const ssize_t n = ::recv(fd, buf, sizeof(buf), 0);
    if (n == 0) break;
    if (n < 0) {
      ::close(fd);
      return absl::DeadlineExceededError(absl::StrCat("no complete answer from ", address));
    }
    resp.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  const size_t body = resp.find("\r\n\r\n");
  if (resp.compare(0, 9, "HTTP/1.1 ") != 0 && resp.compare(0, 9, "HTTP/1.0 ") != 0) {
    return absl::InternalError(absl::StrCat("not an HTTP answer from ", address));
  }
  if (resp.compare(9, 3, "200") != 0 || body == std::string::npos) {
    return absl::InternalError(
        absl::StrCat(address, " answered ", resp.substr(0, resp.find('\r'))));
  }
  return resp.substr(body + 4);
}

// Sum of the samples named exactly `name` whose labels include every pair of `labels`.
inline double SumSamples(const std::string& text, const std::string& name,
                         const std::map<std::string, std::string>& labels = {}) {
  double sum = 0;
  std::istringstream lines(text);
  std::string line;
  while (std::getline(lines, line)) {
    if (line.empty() || line[0] == '#') continue;
    const size_t name_end = line.find_first_of("{ ");
    if (name_end == std::string::npos || line.compare(0, name_end, name) != 0 ||
        name_end != name.size()) {
      continue;
    }
    size_t value_at = name_end;
    std::string label_text;
    if (line[name_end] == '{') {
      const size_t close = line.find('}', name_end);
      if (close == std::string::npos) continue;
      label_text = line.substr(name_end + 1, close - name_end - 1);
      value_at = close + 1;
    }
    bool match = true;
    for (const auto& [k, v] : labels) {
      const std::string pair = absl::StrCat(k, "=\"", v, "\"");
      size_t at = label_text.find(pair);
      while (at != std::string::npos && at != 0 && label_text[at - 1] != ',') {
        at = label_text.find(pair, at + 1);
      }
      if (at == std::string::npos) match = false;
    }
    if (!match) continue;
    std::istringstream value(line.substr(value_at));
    double x = 0;
    if (value >> x) sum += x;
  }
  return sum;
}

}  // namespace moemesh::testing
