// DelayProxy: a TCP forwarder that adds a fixed one-way latency, for a testbed that behaves
// like machines apart (the kernel here has no netem).
//
//   auto proxy = DelayProxy::Start({.target = "127.0.0.1:5000", .one_way_delay =
//   absl::Micros(250)});
//   // connect to (*proxy)->address() instead of 127.0.0.1:5000
//
// Every accepted connection is paired with a new connection to `target`. Bytes are forwarded
// in both directions, each chunk no earlier than `one_way_delay` after it was read: a reader
// thread per direction stamps chunks into a queue as fast as the socket delivers them and a
// writer thread sends each one when it falls due, so the delay adds latency without limiting
// bandwidth (it is not a sleep per read). A half-close (EOF) travels with the same delay.
// Writer threads ask the kernel for 1 ns timer slack and wake early by their recent
// oversleep, yielding the last microseconds, so that short delays stay accurate.
//
// Listens on loopback. Thread-safe; the destructor stops accepting, closes every connection
// and joins every thread.
#pragma once

#include <atomic>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace moemesh {

struct DelayProxyOptions {
  std::string listen_host = "127.0.0.1";
  int listen_port = 0;  // 0 picks a free one
  std::string target;   // host:port (IPv4 literal or a name getaddrinfo resolves)
  absl::Duration one_way_delay = absl::ZeroDuration();
  // Run the forwarding threads at real-time priority (SCHED_FIFO, when permitted): they use
  // little CPU, and on a testbed whose CPUs are all busy computing they must not wait for a
  // time slice, as a NIC does not. Falls back to normal scheduling silently.
  bool realtime = false;
};

class DelayProxy {
 public:
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<DelayProxy>> Start(DelayProxyOptions options);
  ~DelayProxy();
  DelayProxy(const DelayProxy&) = delete;
  DelayProxy& operator=(const DelayProxy&) = delete;

  int port() const { return port_; }
  // "host:port" to connect to.
  std::string address() const;
  // Connections accepted so far.
  int64_t connections() const { return connections_.load(); }

 private:
  struct Conn;
  explicit DelayProxy(DelayProxyOptions options);
  void AcceptLoop();

  const DelayProxyOptions options_;
  int listen_fd_ = -1;
  int wake_[2] = {-1, -1};  // a pipe that wakes the acceptor on shutdown
  int port_ = 0;
  std::atomic<int64_t> connections_{0};
  std::atomic<int64_t> oversleep_ns_{0};  // writers' recent timer oversleep
  std::thread acceptor_;
  absl::Mutex mu_;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::unique_ptr<Conn>> conns_ ABSL_GUARDED_BY(mu_);
};

}  // namespace moemesh
