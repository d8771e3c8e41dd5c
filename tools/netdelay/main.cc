// netdelay: a TCP proxy that adds a fixed one-way delay in both directions, at full bandwidth.
//
//   netdelay --target 127.0.0.1:5000 --delay_us 250 [--port 0] [--port_file F]
//
// Clients connect to the printed port instead of the target. See services/net/delay_proxy.h
// for how the delay is applied (a timestamped queue per direction, not a sleep per read).
// Runs until SIGINT or SIGTERM.
#include <csignal>
#include <cstdio>
#include <fstream>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "services/net/delay_proxy.h"

ABSL_FLAG(std::string, target, "", "host:port to forward to");
ABSL_FLAG(int64_t, delay_us, 0, "one-way delay in microseconds, added in each direction");
ABSL_FLAG(std::string, host, "127.0.0.1", "address to listen on");
ABSL_FLAG(int, port, 0, "port to listen on (0 picks a free one)");
ABSL_FLAG(std::string, port_file, "", "write the bound port here once listening");

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);  // before any thread starts
  moemesh::DelayProxyOptions o;
  o.target = absl::GetFlag(FLAGS_target);
  o.listen_host = absl::GetFlag(FLAGS_host);
  o.listen_port = absl::GetFlag(FLAGS_port);
  o.one_way_delay = absl::Microseconds(absl::GetFlag(FLAGS_delay_us));
  if (o.target.empty()) {
    std::fprintf(stderr, "netdelay: --target is required\n");
    return 2;
  }
  auto proxy = moemesh::DelayProxy::Start(o);
  if (!proxy.ok()) {
    std::fprintf(stderr, "netdelay: %s\n", proxy.status().ToString().c_str());
    return 1;
  }
  std::fprintf(stderr, "netdelay: %s -> %s, one-way delay %lld us\n", (*proxy)->address().c_str(),
               o.target.c_str(), static_cast<long long>(absl::GetFlag(FLAGS_delay_us)));
  if (const std::string pf = absl::GetFlag(FLAGS_port_file); !pf.empty()) {
    std::ofstream(pf + ".tmp") << (*proxy)->port() << "\n";
    std::rename((pf + ".tmp").c_str(), pf.c_str());
  }
  int sig = 0;
  sigwait(&set, &sig);
  return 0;
}
