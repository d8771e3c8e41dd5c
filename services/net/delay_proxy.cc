#include "services/net/delay_proxy.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <deque>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

namespace moemesh {

namespace {

constexpr size_t kChunkBytes = 256 * 1024;
constexpr absl::Duration kMaxSpin = absl::Microseconds(20);

absl::StatusOr<std::pair<std::string, std::string>> SplitHostPort(const std::string& hp) {
  const size_t colon = hp.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == hp.size()) {
    return absl::InvalidArgumentError(absl::StrCat("expected host:port, got '", hp, "'"));
  }
  return std::make_pair(hp.substr(0, colon), hp.substr(colon + 1));
}

int ConnectTo(const std::string& target) {
  auto hp = SplitHostPort(target);
  if (!hp.ok()) return -1;
  addrinfo hints = {};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  if (::getaddrinfo(hp->first.c_str(), hp->second.c_str(), &hints, &res) != 0) return -1;
  int fd = -1;
  for (addrinfo* a = res; a != nullptr; a = a->ai_next) {
    fd = ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) continue;
    if (::connect(fd, a->ai_addr, a->ai_addrlen) == 0) break;
    ::close(fd);
    fd = -1;
  }
  ::freeaddrinfo(res);
  return fd;
}

void NoDelay(int fd) {
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

}  // namespace

// One proxied connection: two directions, each a reader and a writer thread around a queue of
// timestamped chunks. The sockets are closed only once all four threads have ended.
struct DelayProxy::Conn {
  struct Chunk {
    absl::Time due;
    std::string bytes;  // empty: end of stream
  };
  struct Direction {
    int src = -1, dst = -1;
    absl::Mutex mu;
    std::deque<Chunk> queue ABSL_GUARDED_BY(mu);
  };

  Conn(int a, int b, absl::Duration delay, std::atomic<int64_t>* oversleep_ns)
      : a_fd(a), b_fd(b), delay(delay), oversleep_ns(oversleep_ns) {
    forward.src = a;
    forward.dst = b;
    backward.src = b;
    backward.dst = a;
  }
  ~Conn() {
    for (auto& t : threads)
      if (t.joinable()) t.join();
    ::close(a_fd);
    ::close(b_fd);
  }

  void Start(bool realtime) {
    for (Direction* d : {&forward, &backward}) {
      threads.emplace_back([this, d, realtime] {
        if (realtime) Realtime();
        Read(d);
      });
      threads.emplace_back([this, d, realtime] {
        if (realtime) Realtime();
        Write(d);
      });
    }
  }

  static void Realtime() {
    sched_param p = {};
    p.sched_priority = 10;
    ::pthread_setschedparam(::pthread_self(), SCHED_FIFO, &p);  // best effort
  }

  // Ends both directions: readers see EOF or an error, writers drop what is queued.
  void Shutdown() {
    broken.store(true);
    ::shutdown(a_fd, SHUT_RDWR);
    ::shutdown(b_fd, SHUT_RDWR);
  }

  void Read(Direction* d) {
    std::string buf(kChunkBytes, '\0');
    for (;;) {
      const ssize_t n = ::recv(d->src, buf.data(), buf.size(), 0);
      if (n < 0 && errno == EINTR) continue;
      Chunk c{absl::Now() + delay, n > 0 ? buf.substr(0, static_cast<size_t>(n)) : std::string()};
      {
        absl::MutexLock lock(&d->mu);
        d->queue.push_back(std::move(c));
      }
      if (n <= 0) break;
    }
    finished.fetch_add(1);
  }

  void Write(Direction* d) {
    ::prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);  // 1 ns: wake when asked, not 50 µs later
    absl::Duration oversleep = absl::Nanoseconds(oversleep_ns->load());
    for (;;) {
      Chunk c;
      {
        absl::MutexLock lock(&d->mu);
        d->mu.Await(absl::Condition(
            +[](std::deque<Chunk>* q) { return !q->empty(); }, &d->queue));
        c = std::move(d->queue.front());
        d->queue.pop_front();
      }
      // Sleep until the chunk is due less the timer's recent mean oversleep (a plain sleep wakes
      // tens of µs late on a busy VM), so that wake-ups centre on the due time, then yield away
      // at most kMaxSpin of what is left. The spin used to last up to 300 µs per chunk, at
      // real-time priority on the CPUs the mesh runs on: time a real link never takes from its
      // hosts. The added delay is as exact as it was (netdelay_test).
      const absl::Time target = c.due - std::min(oversleep, absl::Microseconds(200));
      if (const absl::Time now = absl::Now(); target > now) {
        absl::SleepFor(target - now);
        const absl::Duration late = absl::Now() - target;
        oversleep =
            std::clamp(oversleep * 0.9 + late * 0.1, absl::ZeroDuration(), absl::Microseconds(200));
        oversleep_ns->store(absl::ToInt64Nanoseconds(oversleep));  // the next connection's start
      }
      const absl::Time spin_until = std::min(c.due, absl::Now() + kMaxSpin);
      while (absl::Now() < spin_until) ::sched_yield();
      if (c.bytes.empty()) {
        ::shutdown(d->dst, SHUT_WR);
        break;
      }
      size_t off = 0;
      while (off < c.bytes.size() && !broken.load()) {
        const ssize_t n = ::send(d->dst, c.bytes.data() + off, c.bytes.size() - off, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
          Shutdown();
          break;
        }
        off += static_cast<size_t>(n);
      }
      if (broken.load()) {
        // Drain to the end-of-stream marker the reader will push, then stop.
        absl::MutexLock lock(&d->mu);
        for (;;) {
          d->mu.Await(absl::Condition(
              +[](std::deque<Chunk>* q) { return !q->empty(); }, &d->queue));
          const bool eof = d->queue.front().bytes.empty();
          d->queue.pop_front();
          if (eof) break;
        }
        break;
      }
    }
    finished.fetch_add(1);
  }

  const int a_fd, b_fd;
  const absl::Duration delay;
  std::atomic<int64_t>* const oversleep_ns;  // the proxy's estimate, shared by connections
  Direction forward, backward;
  std::atomic<bool> broken{false};
  std::atomic<int> finished{0};
  std::vector<std::thread> threads;
};

DelayProxy::DelayProxy(DelayProxyOptions options) : options_(std::move(options)) {}

absl::StatusOr<std::unique_ptr<DelayProxy>> DelayProxy::Start(DelayProxyOptions options) {
  if (options.one_way_delay < absl::ZeroDuration())
    return absl::InvalidArgumentError("one_way_delay must be >= 0");
  if (auto hp = SplitHostPort(options.target); !hp.ok()) return hp.status();
  std::unique_ptr<DelayProxy> p(new DelayProxy(std::move(options)));
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return absl::InternalError(absl::StrCat("socket: ", std::strerror(errno)));
  p->listen_fd_ = fd;
  int one = 1;
  ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  sockaddr_in sa = {};
  sa.sin_family = AF_INET;
  sa.sin_port = htons(static_cast<uint16_t>(p->options_.listen_port));
  if (::inet_pton(AF_INET, p->options_.listen_host.c_str(), &sa.sin_addr) != 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("listen_host must be an IPv4 address, got ", p->options_.listen_host));
  }
  if (::bind(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) != 0 || ::listen(fd, 64) != 0) {
    return absl::UnavailableError(absl::StrCat("bind/listen ", p->options_.listen_host, ":",
                                               p->options_.listen_port, ": ",
                                               std::strerror(errno)));
  }
  socklen_t len = sizeof(sa);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&sa), &len);
  p->port_ = ntohs(sa.sin_port);
  if (::pipe2(p->wake_, O_CLOEXEC) != 0) return absl::InternalError("pipe2 failed");
  p->acceptor_ = std::thread([raw = p.get()] { raw->AcceptLoop(); });
  return p;
}

std::string DelayProxy::address() const { return absl::StrCat(options_.listen_host, ":", port_); }

void DelayProxy::AcceptLoop() {
  for (;;) {
    pollfd fds[2] = {{listen_fd_, POLLIN, 0}, {wake_[0], POLLIN, 0}};
    if (::poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      return;
    }
    if (fds[1].revents != 0) return;
    const int a = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (a < 0) continue;
    const int b = ConnectTo(options_.target);
    if (b < 0) {
      ::close(a);  // the client sees the connection refused by the far end
      continue;
    }
    NoDelay(a);
    NoDelay(b);
    connections_.fetch_add(1);
    auto conn = std::make_unique<Conn>(a, b, options_.one_way_delay, &oversleep_ns_);
    absl::MutexLock lock(&mu_);
    if (stopping_) {
      conn->Shutdown();
      conn->Start(false);
      continue;  // destroyed (joined) at once
    }
    // Reap connections whose four threads have ended.
    for (auto it = conns_.begin(); it != conns_.end();) {
      it = (*it)->finished.load() == 4 ? conns_.erase(it) : it + 1;
    }
    conn->Start(options_.realtime);
    conns_.push_back(std::move(conn));
  }
}

DelayProxy::~DelayProxy() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  if (wake_[1] >= 0) {
    const char x = 0;
    [[maybe_unused]] ssize_t n = ::write(wake_[1], &x, 1);
  }
  if (acceptor_.joinable()) acceptor_.join();
  std::vector<std::unique_ptr<Conn>> conns;
  {
    absl::MutexLock lock(&mu_);
    conns.swap(conns_);
  }
  for (auto& c : conns) c->Shutdown();
  conns.clear();  // joins
  if (listen_fd_ >= 0) ::close(listen_fd_);
  for (int fd : wake_)
    if (fd >= 0) ::close(fd);
}

}  // namespace moemesh
