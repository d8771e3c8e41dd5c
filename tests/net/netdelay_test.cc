// The testbed's delaying proxy (services/net/delay_proxy.h, tools/netdelay): it adds the set
// one-way delay in each direction, forwards every byte unchanged, and passes a half-close on.
// The latency check compares medians of many ping-pongs, direct and through the proxy, so
// that a loaded machine's outliers do not decide it.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "services/net/delay_proxy.h"

namespace moemesh {
namespace {

// Echoes every connection's bytes back until EOF, then closes it.
class EchoServer {
 public:
  EchoServer() {
    fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in sa = {};
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    EXPECT_EQ(::bind(fd_, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)), 0);
    EXPECT_EQ(::listen(fd_, 16), 0);
    socklen_t len = sizeof(sa);
    ::getsockname(fd_, reinterpret_cast<sockaddr*>(&sa), &len);
    port_ = ntohs(sa.sin_port);
    thread_ = std::thread([this] {
      for (;;) {
        const int c = ::accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC);
        if (c < 0) return;
        int one = 1;
        ::setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        workers_.emplace_back([c] {
          char buf[65536];
          ssize_t n;
          while ((n = ::recv(c, buf, sizeof(buf), 0)) > 0) {
            for (ssize_t off = 0; off < n;) {
              const ssize_t w = ::send(c, buf + off, n - off, MSG_NOSIGNAL);
              if (w <= 0) break;
              off += w;
            }
          }
          ::close(c);
        });
      }
    });
  }
  ~EchoServer() {
    ::shutdown(fd_, SHUT_RDWR);
    ::close(fd_);
    thread_.join();
    for (auto& w : workers_) w.join();
  }
  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }
  int port() const { return port_; }

 private:
  int fd_ = -1;
  int port_ = 0;
  std::thread thread_;
  std::vector<std::thread> workers_;
};

int Connect(int port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in sa = {};
  sa.sin_family = AF_INET;
  sa.sin_port = htons(static_cast<uint16_t>(port));
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) != 0) {
    ::close(fd);
    return -1;
  }
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  return fd;
}

bool ReadFull(int fd, char* p, size_t n) {
  while (n > 0) {
    const ssize_t r = ::recv(fd, p, n, 0);
    if (r <= 0) return false;
    p += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

// Round-trip times in microseconds of `rounds` 64-byte ping-pongs on one connection.
std::vector<double> PingPong(int port, int rounds) {
  std::vector<double> rtt;
  const int fd = Connect(port);
  if (fd < 0) return rtt;
  char msg[64], back[64];
  std::memset(msg, 'x', sizeof(msg));
  for (int i = 0; i < rounds; ++i) {
    const absl::Time a = absl::Now();
    if (::send(fd, msg, sizeof(msg), MSG_NOSIGNAL) != sizeof(msg)) break;
    if (!ReadFull(fd, back, sizeof(back))) break;
    rtt.push_back(absl::ToDoubleMicroseconds(absl::Now() - a));
  }
  ::close(fd);
  return rtt;
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

// The delay the tool adds is measured against the same proxy with no delay, whose own cost
// (two more loopback hops and two thread hand-offs per direction, ~90 µs per round trip on a
// small VM) is a fixed forwarding cost, reported apart.
class NetDelayLatency : public ::testing::TestWithParam<int> {};

TEST_P(NetDelayLatency, AddedRoundTripIsTwiceTheDelay) {
  const int delay_us = GetParam();
  EchoServer echo;
  // As the testbed runs it: forwarding threads at real-time priority when permitted.
  auto proxy = DelayProxy::Start(
      {.target = echo.address(), .one_way_delay = absl::Microseconds(delay_us), .realtime = true});
  ASSERT_TRUE(proxy.ok()) << proxy.status();
  auto plain = DelayProxy::Start({.target = echo.address(), .realtime = true});
  ASSERT_TRUE(plain.ok()) << plain.status();
  // Within 10% of twice the delay; at short delays at least 100 µs, since a loaded 2-core VM
  // adds tens of µs of wake-up latency per direction that no timer compensation removes
  // (measured +10..+45 µs per direction under other people's builds). A measurement taken
  // while other tests load both cores can stray past that, so up to three are taken and the
  // first within the bound passes; a proxy that adds the wrong delay misses all three.
  const double tolerance = std::max(0.1 * 2.0 * delay_us, 100.0);
  double added = 0, forward_cost = 0;
  int attempts = 0;
  for (; attempts < 3; ++attempts) {
    // Interleave the three paths so that all see the same background load.
    std::vector<double> direct, forwarded, delayed;
    for (int block = 0; block < 5; ++block) {
      auto d = PingPong(echo.port(), 40);
      auto f = PingPong((*plain)->port(), 40);
      auto p = PingPong((*proxy)->port(), 40);
      ASSERT_EQ(d.size(), 40u);
      ASSERT_EQ(f.size(), 40u);
      ASSERT_EQ(p.size(), 40u);
      direct.insert(direct.end(), d.begin(), d.end());
      forwarded.insert(forwarded.end(), f.begin(), f.end());
      delayed.insert(delayed.end(), p.begin(), p.end());
    }
    added = Median(delayed) - Median(forwarded);
    forward_cost = Median(forwarded) - Median(direct);
    std::printf(
        "delay %d us, measurement %d: median round trip direct %.0f us, through the proxy with "
        "no delay %.0f us, with the delay %.0f us; added %.0f us (expected %d)\n",
        delay_us, attempts + 1, Median(direct), Median(forwarded), Median(delayed), added,
        2 * delay_us);
    if (std::abs(added - 2.0 * delay_us) <= tolerance) break;
  }
  EXPECT_NEAR(added, 2.0 * delay_us, tolerance);
  // The forwarding cost itself stays small next to the delays the testbed sets.
  EXPECT_LT(forward_cost, 1000.0);
  EXPECT_EQ((*proxy)->connections(), 5 * std::min(attempts + 1, 3));
}

INSTANTIATE_TEST_SUITE_P(Delays, NetDelayLatency, ::testing::Values(250, 1000));

TEST(NetDelay, ForwardsEveryByteBothWaysAndPassesEofOn) {
  EchoServer echo;
  auto proxy =
      DelayProxy::Start({.target = echo.address(), .one_way_delay = absl::Microseconds(500)});
  ASSERT_TRUE(proxy.ok()) << proxy.status();
  const int fd = Connect((*proxy)->port());
  ASSERT_GE(fd, 0);
  std::string sent(8 << 20, '\0');
  for (size_t i = 0; i < sent.size(); ++i) sent[i] = static_cast<char>((i * 131 + i / 7) & 0xff);
  std::thread writer([&] {
    for (size_t off = 0; off < sent.size();) {
      const ssize_t w =
          ::send(fd, sent.data() + off, std::min<size_t>(100000, sent.size() - off), MSG_NOSIGNAL);
      if (w <= 0) break;
      off += static_cast<size_t>(w);
    }
    ::shutdown(fd, SHUT_WR);  // the echo server sees EOF through the proxy and closes
  });
  std::string got;
  char buf[65536];
  ssize_t n;
  while ((n = ::recv(fd, buf, sizeof(buf), 0)) > 0) got.append(buf, static_cast<size_t>(n));
  writer.join();
  ::close(fd);
  EXPECT_EQ(n, 0) << "the echo server's close must arrive as EOF";
  ASSERT_EQ(got.size(), sent.size());
  EXPECT_TRUE(got == sent);
}

TEST(NetDelay, RefusesABadTarget) {
  EXPECT_FALSE(DelayProxy::Start({.target = "nocolon"}).ok());
  EXPECT_FALSE(
      DelayProxy::Start({.target = "127.0.0.1:1", .one_way_delay = absl::Microseconds(-1)}).ok());
}

}  // namespace
}  // namespace moemesh
