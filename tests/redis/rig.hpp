// The fault rig for the Redis tests: throwaway redis-servers in a scratch directory on loopback
// ports, and a TCP proxy that can black-hole or delay what passes through it. Real processes and
// real sockets; nothing here knows weir.
#pragma once

#include <fmt/format.h>
#include <boost/asio.hpp>

#include <signal.h>
#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace rig {

namespace asio = boost::asio;

// Runs a shell command; its status.
inline int shell(const std::string& command) { return std::system(command.c_str()); }

// A redis-server of its own on `port`, with no persistence unless `extra` asks for it. Stopped
// (without saving) when destroyed.
class redis_server {
 public:
  redis_server(int port, std::string extra = "--save '' --appendonly no")
      : port_(port), extra_(std::move(extra)) {
    start();
  }
  ~redis_server() { stop(); }
  redis_server(const redis_server&) = delete;
  redis_server& operator=(const redis_server&) = delete;

  int port() const { return port_; }

  // Starts it and waits until it accepts connections (it may still be loading its data).
  void start() {
    const int status =
        shell(fmt::format("redis-server --port {0} --bind 127.0.0.1 --daemonize yes --dir {1} "
                          "--pidfile {1}/redis-{0}.pid --logfile {1}/redis-{0}.log {2}",
                          port_, WEIR_REDIS_SCRATCH, extra_));
    if (status != 0) throw std::runtime_error("redis-server did not start");
    for (int attempt = 0; attempt < 100; ++attempt) {
      if (const auto answer = ping();
          (answer.starts_with("PONG") || answer.starts_with("LOADING")) && pid() > 0)
        return;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    throw std::runtime_error(fmt::format("redis-server on port {} does not answer", port_));
  }

  void stop() {
    shell(fmt::format("redis-cli -p {} shutdown nosave > /dev/null 2>&1", port_));
    // A paused server cannot shut down: wake it first, then let it go.
    if (const auto p = pid(); p > 0) {
      ::kill(p, SIGCONT);
      shell(fmt::format("redis-cli -p {} shutdown nosave > /dev/null 2>&1", port_));
    }
    for (int attempt = 0; attempt < 100 && pid() > 0 && ::kill(pid(), 0) == 0; ++attempt)
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }

  // SIGKILL: the process is gone at once, as a crashed host (no shutdown, no goodbye).
  void kill() {
    if (const auto p = pid(); p > 0) ::kill(p, SIGKILL);
  }

  // SIGSTOP: the process holds its sockets but answers nothing, as a hung or swapped-out host.
  void pause() { ::kill(pid(), SIGSTOP); }
  void resume() { ::kill(pid(), SIGCONT); }

  // What `redis-cli ping` answers now (PONG, or an error such as LOADING ...).
  std::string ping() const {
    std::unique_ptr<FILE, int (*)(FILE*)> out(
        ::popen(fmt::format("redis-cli -p {} ping 2>&1", port_).c_str(), "r"), ::pclose);
    char line[256] = {};
    if (!out || !std::fgets(line, sizeof line, out.get())) return {};
    return line;
  }

  pid_t pid() const {
    std::ifstream in(fmt::format("{}/redis-{}.pid", WEIR_REDIS_SCRATCH, port_));
    pid_t p = 0;
    in >> p;
    return p;
  }

 private:
  int port_;
  std::string extra_;
};

// What `redis-cli -p port words...` prints.
inline std::string ask(int port, const std::string& words) {
  std::unique_ptr<FILE, int (*)(FILE*)> out(
      ::popen(fmt::format("redis-cli -p {} {} 2>&1", port, words).c_str(), "r"), ::pclose);
  std::string text;
  char chunk[512];
  while (out && std::fgets(chunk, sizeof chunk, out.get())) text += chunk;
  return text;
}

// Polls `ok` every 50 ms for up to `limit`; whether it came true.
template <class Condition>
bool eventually(Condition ok, std::chrono::milliseconds limit = std::chrono::seconds(15)) {
  for (auto waited = std::chrono::milliseconds(0); waited < limit;
       waited += std::chrono::milliseconds(50)) {
    if (ok()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return ok();
}

// A primary, a replica and a sentinel watching them under `name`, quick to decide: the primary
// is down after 500 ms of silence, and the one sentinel is a quorum.
class sentinel_group {
 public:
  sentinel_group(int first_port, std::string name)
      : name_(std::move(name)),
        primary_(std::make_unique<redis_server>(first_port)),
        replica_(first_port + 1,
                 fmt::format("--save '' --appendonly no --replicaof 127.0.0.1 {}", first_port)),
        sentinel_port_(first_port + 2) {
    const auto config = fmt::format("{}/sentinel-{}.conf", WEIR_REDIS_SCRATCH, sentinel_port_);
    std::ofstream(config) << fmt::format(
        "port {}\nbind 127.0.0.1\nsentinel monitor {} 127.0.0.1 {} 1\n"
        "sentinel down-after-milliseconds {} 500\nsentinel failover-timeout {} 5000\n",
        sentinel_port_, name_, first_port, name_, name_);
    if (shell(fmt::format("redis-server {0} --sentinel --daemonize yes --dir {1} --pidfile "
                          "{1}/sentinel-{2}.pid --logfile {1}/sentinel-{2}.log",
                          config, WEIR_REDIS_SCRATCH, sentinel_port_)) != 0)
      throw std::runtime_error("redis-server --sentinel did not start");
    const bool ready = eventually([&] {
      return ask(replica_.port(), "info replication").find("master_link_status:up") !=
                 std::string::npos &&
             primary_at() == first_port;
    });
    if (!ready) throw std::runtime_error("the sentinel group did not come up");
  }
  ~sentinel_group() {
    shell(fmt::format("redis-cli -p {} shutdown nosave > /dev/null 2>&1", sentinel_port_));
  }

  int sentinel_port() const { return sentinel_port_; }
  redis_server& primary() { return *primary_; }
  const std::string& name() const { return name_; }

  // The port the sentinel says the primary is on now (0: it does not say).
  int primary_at() const {
    const auto text = ask(sentinel_port_, "sentinel get-master-addr-by-name " + name_);
    const auto line = text.find('\n');
    return line == std::string::npos ? 0 : std::atoi(text.c_str() + line + 1);
  }

 private:
  std::string name_;
  std::unique_ptr<redis_server> primary_;
  redis_server replica_;
  int sentinel_port_;
};

// Three cluster nodes on loopback sharing the slots, no replicas.
class cluster {
 public:
  explicit cluster(int first_port) {
    for (int n = 0; n < 3; ++n) {
      const int port = first_port + n;
      std::remove(fmt::format("{}/nodes-{}.conf", WEIR_REDIS_SCRATCH, port).c_str());
      nodes_.push_back(std::make_unique<redis_server>(
          port, fmt::format("--save '' --appendonly no --cluster-enabled yes "
                            "--cluster-config-file nodes-{}.conf --cluster-node-timeout 2000",
                            port)));
    }
    if (shell(fmt::format("redis-cli --cluster create 127.0.0.1:{} 127.0.0.1:{} 127.0.0.1:{} "
                          "--cluster-replicas 0 --cluster-yes > /dev/null 2>&1",
                          first_port, first_port + 1, first_port + 2)) != 0)
      throw std::runtime_error("redis-cli --cluster create failed");
    const bool ok = eventually([&] {
      for (const auto& n : nodes_)
        if (ask(n->port(), "cluster info").find("cluster_state:ok") == std::string::npos)
          return false;
      return true;
    });
    if (!ok) throw std::runtime_error("the cluster did not come up");
  }

  redis_server& node(std::size_t n) { return *nodes_[n]; }

  // The node (index) that serves `key`'s slot now: the one that does not redirect.
  std::size_t owner(const std::string& key) {
    for (std::size_t n = 0; n < nodes_.size(); ++n) {
      const auto answer = ask(nodes_[n]->port(), "exists '" + key + "'");
      if (!answer.starts_with("MOVED") && !answer.starts_with("ASK")) return n;
    }
    throw std::runtime_error("no node serves the slot");
  }

  std::string id(std::size_t n) {
    auto text = ask(nodes_[n]->port(), "cluster myid");
    while (!text.empty() && (text.back() == '\n' || text.back() == '\r')) text.pop_back();
    return text;
  }

 private:
  std::vector<std::unique_ptr<redis_server>> nodes_;
};

// A TCP proxy on its own thread in front of a port on loopback. It forwards, delays every chunk
// by a set time, or black-holes: accepts and reads, and never answers (how a partition or a
// vanished host looks from the client's side: the connection stays open and silent).
class proxy {
 public:
  explicit proxy(int target_port)
      : target_(asio::ip::make_address("127.0.0.1"), static_cast<unsigned short>(target_port)),
        acceptor_(io_, {asio::ip::make_address("127.0.0.1"), 0}) {
    asio::co_spawn(io_, accept(), asio::detached);
    thread_ = std::thread([this] { io_.run(); });
  }
  ~proxy() {
    io_.stop();
    thread_.join();
  }
  proxy(const proxy&) = delete;
  proxy& operator=(const proxy&) = delete;

  int port() const { return acceptor_.local_endpoint().port(); }
  void black_hole(bool on) { black_hole_ = on; }
  void delay(std::chrono::milliseconds d) { delay_ms_ = d.count(); }

 private:
  using socket_ptr = std::shared_ptr<asio::ip::tcp::socket>;

  asio::awaitable<void> accept() {
    for (;;) {
      auto client = std::make_shared<asio::ip::tcp::socket>(
          co_await acceptor_.async_accept(asio::use_awaitable));
      auto server = std::make_shared<asio::ip::tcp::socket>(io_);
      boost::system::error_code ec;
      co_await server->async_connect(target_, asio::redirect_error(asio::use_awaitable, ec));
      if (ec) continue;  // the target is down: the client sees its connection closed
      asio::co_spawn(io_, pump(client, server), asio::detached);
      asio::co_spawn(io_, pump(server, client), asio::detached);
    }
  }

  asio::awaitable<void> pump(socket_ptr from, socket_ptr to) {
    char buffer[16 * 1024];
    asio::steady_timer wait(io_);
    boost::system::error_code ec;
    for (;;) {
      const auto n = co_await from->async_read_some(asio::buffer(buffer),
                                                    asio::redirect_error(asio::use_awaitable, ec));
      if (ec) break;
      if (const auto d = delay_ms_.load(); d > 0) {
        wait.expires_after(std::chrono::milliseconds(d));
        co_await wait.async_wait(asio::redirect_error(asio::use_awaitable, ec));
      }
      if (black_hole_) continue;  // swallowed
      co_await asio::async_write(*to, asio::buffer(buffer, n),
                                 asio::redirect_error(asio::use_awaitable, ec));
      if (ec) break;
    }
    from->close(ec);
    to->close(ec);
  }

  asio::io_context io_;
  asio::ip::tcp::endpoint target_;
  asio::ip::tcp::acceptor acceptor_;
  std::atomic<bool> black_hole_{false};
  std::atomic<long> delay_ms_{0};
  std::thread thread_;
};

}  // namespace rig
