// A server that misbehaves on purpose, for the HTTP clients' tests: on 127.0.0.1, on its own
// thread, it answers each request (any connection) with the next of the raw replies it was given
// — interim 1xx responses, bytes past the response, huge headers, endless lines — written whole
// or trickled a few bytes at a time, and keeps every request it was sent.
//
//     weir::testing::hostile_server server({"HTTP/1.1 103 Early Hints\r\n\r\n"
//                                           "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"});
//     auto url = server.url();  // http://127.0.0.1:port
#pragma once

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/buffer.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstddef>
#include <exception>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

namespace weir::testing {

struct hostile_server_options {
  // Each reply is written in pieces of this many bytes, `pause` apart (0: whole, at once), after
  // its first `at_once` bytes.
  std::size_t trickle_bytes = 0;
  std::size_t at_once = 0;
  std::chrono::milliseconds pause{0};
  // Each reply's first byte waits this long after its request (a server that sends its headers
  // with its first token).
  std::chrono::milliseconds answer_after{0};
  // With no reply left for a request, the connection stays open, sending nothing (true), or
  // closes.
  bool hold_open = true;
};

class hostile_server {
 public:
  explicit hostile_server(std::vector<std::string> replies, hostile_server_options options = {})
      : replies_(std::move(replies)),
        options_(options),
        acceptor_(io_, {boost::asio::ip::make_address_v4("127.0.0.1"), 0}) {
    boost::asio::co_spawn(io_, accept(), boost::asio::detached);
    thread_ = std::thread([this] { io_.run(); });
  }
  ~hostile_server() {
    io_.stop();
    thread_.join();
  }
  hostile_server(const hostile_server&) = delete;
  hostile_server& operator=(const hostile_server&) = delete;

  std::string url() const {
    return "http://127.0.0.1:" + std::to_string(acceptor_.local_endpoint().port());
  }
  unsigned short port() const { return acceptor_.local_endpoint().port(); }

  // Every request received so far, head and body, in order.
  std::vector<std::string> requests() const {
    std::lock_guard lock(mutex_);
    return requests_;
  }
  std::size_t connections() const {
    std::lock_guard lock(mutex_);
    return connections_;
  }
  // Connections the server has let go: the client closed them (or it did, with hold_open off).
  std::size_t connections_ended() const {
    std::lock_guard lock(mutex_);
    return connections_ended_;
  }

 private:
  using tcp = boost::asio::ip::tcp;

  boost::asio::awaitable<void> accept() {
    for (;;) {
      auto [ec, socket] =
          co_await acceptor_.async_accept(boost::asio::as_tuple(boost::asio::use_awaitable));
      if (ec) co_return;
      {
        std::lock_guard lock(mutex_);
        ++connections_;
      }
      boost::asio::co_spawn(io_, serve(std::move(socket)), [this](std::exception_ptr) {
        std::lock_guard lock(mutex_);
        ++connections_ended_;
      });
    }
  }

  // Reads requests (a head, and a body of its Content-Length) and answers each with the next
  // reply; when none is left, holds the connection or closes it.
  boost::asio::awaitable<void> serve(tcp::socket socket) {
    namespace asio = boost::asio;
    std::string in;
    char piece[4096];
    for (;;) {
      std::size_t head_end;
      while ((head_end = in.find("\r\n\r\n")) == std::string::npos) {
        auto [ec, n] = co_await socket.async_read_some(asio::buffer(piece),
                                                       asio::as_tuple(asio::use_awaitable));
        if (ec) co_return;
        in.append(piece, n);
      }
      const std::size_t length = head_end + 4 + content_length(in.substr(0, head_end));
      while (in.size() < length) {
        auto [ec, n] = co_await socket.async_read_some(asio::buffer(piece),
                                                       asio::as_tuple(asio::use_awaitable));
        if (ec) co_return;
        in.append(piece, n);
      }
      std::string reply;
      {
        std::lock_guard lock(mutex_);
        requests_.push_back(in.substr(0, length));
        if (next_ < replies_.size()) reply = replies_[next_++];
      }
      in.erase(0, length);
      if (reply.empty()) {
        if (!options_.hold_open) co_return;
        continue;  // reads on, answers nothing
      }
      co_await write(socket, reply);
    }
  }

  boost::asio::awaitable<void> write(tcp::socket& socket, std::string_view reply) {
    namespace asio = boost::asio;
    const std::size_t step = options_.trickle_bytes ? options_.trickle_bytes : reply.size();
    asio::steady_timer timer(io_);
    if (options_.answer_after.count() > 0) {
      timer.expires_after(options_.answer_after);
      co_await timer.async_wait(asio::as_tuple(asio::use_awaitable));
    }
    for (std::size_t at = 0; at < reply.size();) {
      const std::size_t n = at == 0 && options_.at_once ? options_.at_once : step;
      auto [ec, written] = co_await asio::async_write(socket, asio::buffer(reply.substr(at, n)),
                                                      asio::as_tuple(asio::use_awaitable));
      at += n;
      if (ec) co_return;
      if (options_.pause.count() > 0) {
        timer.expires_after(options_.pause);
        co_await timer.async_wait(asio::as_tuple(asio::use_awaitable));
      }
    }
  }

  static std::size_t content_length(std::string_view head) {
    std::string lower(head);
    std::transform(lower.begin(), lower.end(), lower.begin(),
                   [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
    const auto at = lower.find("\r\ncontent-length:");
    if (at == std::string::npos) return 0;
    std::size_t n = 0;
    for (std::size_t i = at + 17; i < lower.size(); ++i) {
      if (lower[i] == ' ') continue;
      if (lower[i] < '0' || lower[i] > '9') break;
      n = n * 10 + static_cast<std::size_t>(lower[i] - '0');
    }
    return n;
  }

  std::vector<std::string> replies_;
  hostile_server_options options_;
  boost::asio::io_context io_;
  tcp::acceptor acceptor_;
  std::thread thread_;
  mutable std::mutex mutex_;
  std::vector<std::string> requests_;
  std::size_t next_ = 0;
  std::size_t connections_ = 0;
  std::size_t connections_ended_ = 0;
};

}  // namespace weir::testing
