// A small HTTP server for Prometheus: `GET /metrics` answers with the text every source appends.
// It is bounded against slow and malformed clients: each request's header must arrive within
// `request_timeout` and fit in `max_header_bytes`, a connection lives at most
// `connection_timeout`, a request with a body is refused (413), methods other than GET and HEAD
// get 405, other paths 404, and past `max_connections` open at once a new connection is closed at
// once without an answer (counted as refused).
//
//     weir::metrics openai("openai"), anthropic("anthropic");
//     weir::http::metrics_endpoint endpoint(io.get_executor(), {.port = 9464},
//         {weir::http::prometheus_source({openai, anthropic}),
//          [&](std::string& out) { weir::write_prometheus(out, budget.status()); }});
//     endpoint.start();  // then scrape endpoint.url()
//
// Each metric family must come from one source: the text format allows one HELP and TYPE per
// family, so registries of the same kind go into one prometheus_source.
#pragma once

#include <weir/core/error.hpp>
#include <weir/detail/listener.hpp>
#include <weir/observability/metrics.hpp>

#include <fmt/format.h>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/beast/core/error.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/core/tcp_stream.hpp>
#include <boost/beast/http.hpp>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace weir::http {

// Appends families in the Prometheus text format (version 0.0.4) to `out`.
using metrics_source = std::function<void(std::string& out)>;

// A source writing the registries (copies share their counters) with write_prometheus.
inline metrics_source prometheus_source(std::vector<weir::metrics> registries) {
  return [registries = std::move(registries)](std::string& out) {
    std::vector<const weir::metrics*> pointers;
    pointers.reserve(registries.size());
    for (const auto& m : registries) pointers.push_back(&m);
    write_prometheus(out, pointers);
  };
}

struct metrics_endpoint_options {
  std::string address = "127.0.0.1";  // "0.0.0.0" or "::" to be scraped from other hosts
  unsigned short port = 0;            // 0: a free port, reported by start() and port()
  std::string path = "/metrics";
  std::chrono::milliseconds request_timeout{10'000};     // to read one request's header
  std::chrono::milliseconds connection_timeout{60'000};  // a connection's whole life
  std::size_t max_header_bytes = 8 * 1024;               // past it: 431
  std::size_t max_connections = 16;                      // open at once; past it: closed
};

struct metrics_endpoint_stats {
  std::uint64_t scrapes = 0;              // pages served (GET or HEAD on the path)
  std::uint64_t refused_connections = 0;  // closed at once: max_connections were open
  std::uint64_t timeouts = 0;             // connections dropped by a timeout
  std::uint64_t bad_requests = 0;         // answered 4xx
  std::size_t open_connections = 0;
};

class metrics_endpoint {
 public:
  // Throws weir::exception(invalid_argument) for options out of range. Destroy it before its
  // io_context (stop() posts to it).
  metrics_endpoint(boost::asio::any_io_executor ex, metrics_endpoint_options options,
                   std::vector<metrics_source> sources = {})
      : state_(std::make_shared<state>(std::move(ex), std::move(options), std::move(sources))) {
    const auto& o = state_->options;
    constexpr std::string_view who = "metrics_endpoint";
    if (o.request_timeout <= std::chrono::milliseconds::zero())
      weir::detail::invalid_option(who, "request_timeout", o.request_timeout, "be positive");
    if (o.connection_timeout <= std::chrono::milliseconds::zero())
      weir::detail::invalid_option(who, "connection_timeout", o.connection_timeout, "be positive");
    if (o.max_header_bytes < 64)
      weir::detail::invalid_option(who, "max_header_bytes", o.max_header_bytes, "be at least 64");
    if (o.max_connections == 0)
      weir::detail::invalid_option(who, "max_connections", o.max_connections, "be at least 1");
    if (!o.path.starts_with('/'))
      weir::detail::invalid_option(who, "path", fmt::format("'{}'", o.path), "start with '/'");
  }
  ~metrics_endpoint() { stop(); }
  metrics_endpoint(const metrics_endpoint&) = delete;
  metrics_endpoint& operator=(const metrics_endpoint&) = delete;

  // Before start().
  void add_source(metrics_source source) { state_->sources.push_back(std::move(source)); }

  // Binds and listens (throws boost::system::system_error if it cannot) and returns the port.
  unsigned short start() {
    namespace ip = boost::asio::ip;
    auto& s = *state_;
    s.port = weir::detail::listen_on(
        s.acceptor, ip::tcp::endpoint(ip::make_address(s.options.address), s.options.port));
    boost::asio::co_spawn(s.executor, accept(state_), boost::asio::detached);
    return s.port;
  }

  // Closes the acceptor and every open connection, on the server's strand (safe from any
  // thread); each connection's coroutine then ends.
  void stop() {
    boost::asio::post(state_->executor,
                      [s = state_] { weir::detail::close_all(s->acceptor, s->connections); });
  }

  unsigned short port() const noexcept { return state_->port; }
  std::string url() const {
    const auto& o = state_->options;
    const bool v6 = o.address.find(':') != std::string::npos;
    return fmt::format("http://{}{}{}:{}{}", v6 ? "[" : "", o.address, v6 ? "]" : "", port(),
                       o.path);
  }

  metrics_endpoint_stats stats() const {
    const auto& s = *state_;
    return {.scrapes = s.scrapes.load(std::memory_order_relaxed),
            .refused_connections = s.refused.load(std::memory_order_relaxed),
            .timeouts = s.timeouts.load(std::memory_order_relaxed),
            .bad_requests = s.bad_requests.load(std::memory_order_relaxed),
            .open_connections = s.open.load(std::memory_order_relaxed)};
  }

 private:
  using stream_type = boost::beast::tcp_stream;
  using clock = std::chrono::steady_clock;

  struct state {
    state(boost::asio::any_io_executor ex, metrics_endpoint_options o,
          std::vector<metrics_source> src)
        : executor(boost::asio::make_strand(ex)),
          acceptor(executor),
          options(std::move(o)),
          sources(std::move(src)) {}

    boost::asio::strand<boost::asio::any_io_executor> executor;
    boost::asio::ip::tcp::acceptor acceptor;
    metrics_endpoint_options options;
    std::vector<metrics_source> sources;
    unsigned short port = 0;
    std::vector<std::weak_ptr<stream_type>> connections;  // on the strand
    std::atomic<std::uint64_t> scrapes{0}, refused{0}, timeouts{0}, bad_requests{0};
    std::atomic<std::size_t> open{0};
  };

  static boost::asio::awaitable<void> accept(std::shared_ptr<state> s) {
    for (;;) {
      auto [ec, socket] =
          co_await s->acceptor.async_accept(boost::asio::as_tuple(boost::asio::use_awaitable));
      if (ec == boost::asio::error::operation_aborted || !s->acceptor.is_open()) co_return;
      if (ec == boost::asio::error::connection_aborted) continue;  // the client gave up first
      if (ec) {
        // Out of file descriptors, say: try again shortly rather than spin or stop serving.
        boost::asio::steady_timer pause(s->executor, std::chrono::milliseconds(100));
        co_await pause.async_wait(boost::asio::as_tuple(boost::asio::use_awaitable));
        continue;
      }
      if (s->open.load(std::memory_order_relaxed) >= s->options.max_connections) {
        s->refused.fetch_add(1, std::memory_order_relaxed);
        boost::system::error_code ignored;
        socket.close(ignored);
        continue;
      }
      auto stream = std::make_shared<stream_type>(std::move(socket));
      std::erase_if(s->connections, [](const auto& w) { return w.expired(); });
      s->connections.push_back(stream);
      s->open.fetch_add(1, std::memory_order_relaxed);
      boost::asio::co_spawn(s->executor, serve(s, std::move(stream)), boost::asio::detached);
    }
  }

  // One connection: requests one after another (keep-alive) until the client closes, a timeout,
  // a refused request, or stop().
  static boost::asio::awaitable<void> serve(std::shared_ptr<state> s,
                                            std::shared_ptr<stream_type> stream) {
    namespace beast_http = boost::beast::http;
    using boost::asio::as_tuple;
    using boost::asio::use_awaitable;
    struct closer {
      state& s;
      stream_type& stream;
      ~closer() {
        boost::system::error_code ignored;
        stream.socket().shutdown(boost::asio::socket_base::shutdown_both, ignored);
        stream.socket().close(ignored);
        s.open.fetch_sub(1, std::memory_order_relaxed);
      }
    } close_at_end{*s, *stream};

    const auto deadline = clock::now() + s->options.connection_timeout;
    // Each operation may take the request timeout, but never past the connection's deadline.
    const auto arm = [&] {
      stream->expires_after(
          std::max(clock::duration::zero(),
                   std::min<clock::duration>(s->options.request_timeout, deadline - clock::now())));
    };
    boost::beast::flat_buffer buffer(s->options.max_header_bytes);
    for (;;) {
      beast_http::request_parser<beast_http::empty_body> parser;
      parser.header_limit(static_cast<std::uint32_t>(
          std::min<std::size_t>(s->options.max_header_bytes, UINT32_MAX)));
      parser.body_limit(0);
      arm();
      auto [ec, n] =
          co_await beast_http::async_read_header(*stream, buffer, parser, as_tuple(use_awaitable));
      if (ec == boost::beast::error::timeout) {
        s->timeouts.fetch_add(1, std::memory_order_relaxed);
        co_return;
      }
      if (ec == beast_http::error::body_limit) {  // a Content-Length above 0
        co_await refuse(*s, *stream, beast_http::status::payload_too_large, arm);
        co_return;
      }
      if (ec == beast_http::error::header_limit || ec == beast_http::error::buffer_overflow) {
        co_await refuse(*s, *stream, beast_http::status::request_header_fields_too_large, arm);
        co_return;
      }
      if (ec == beast_http::error::end_of_stream || !stream->socket().is_open()) co_return;
      if (ec) {
        co_await refuse(*s, *stream, beast_http::status::bad_request, arm);
        co_return;
      }
      const auto& req = parser.get();
      if (req.method() != beast_http::verb::get && req.method() != beast_http::verb::head) {
        co_await refuse(*s, *stream, beast_http::status::method_not_allowed, arm);
        co_return;
      }
      if (parser.chunked() || parser.content_length().value_or(0) > 0) {
        co_await refuse(*s, *stream, beast_http::status::payload_too_large, arm);
        co_return;
      }
      const std::string_view target = req.target();
      if (target.substr(0, target.find('?')) != s->options.path) {
        co_await refuse(*s, *stream, beast_http::status::not_found, arm);
        co_return;
      }

      beast_http::response<beast_http::string_body> res(beast_http::status::ok, req.version());
      res.set(beast_http::field::content_type, "text/plain; version=0.0.4");
      res.keep_alive(req.keep_alive());
      bool written = true;
      try {
        for (const auto& source : s->sources) source(res.body());
      } catch (const std::exception&) {
        written = false;
      }
      if (!written) {
        // A source failed: a partial page would read as counters reset, so none at all.
        co_await refuse(*s, *stream, beast_http::status::internal_server_error, arm);
        co_return;
      }
      res.prepare_payload();  // HEAD tells the length of what GET would send, and no more
      s->scrapes.fetch_add(1, std::memory_order_relaxed);
      arm();
      beast_http::serializer<false, beast_http::string_body> serializer(res);
      if (req.method() == beast_http::verb::head) serializer.split(true);
      auto [wec, w] =
          req.method() == beast_http::verb::head
              ? co_await beast_http::async_write_header(*stream, serializer,
                                                        as_tuple(use_awaitable))
              : co_await beast_http::async_write(*stream, serializer, as_tuple(use_awaitable));
      if (wec == boost::beast::error::timeout) s->timeouts.fetch_add(1, std::memory_order_relaxed);
      if (wec || !res.keep_alive()) co_return;
    }
  }

  // Answers `status` with a short reason and closes (the caller returns after this).
  template <class Arm>
  static boost::asio::awaitable<void> refuse(state& s, stream_type& stream,
                                             boost::beast::http::status status, const Arm& arm) {
    namespace beast_http = boost::beast::http;
    if (status != beast_http::status::internal_server_error)
      s.bad_requests.fetch_add(1, std::memory_order_relaxed);
    beast_http::response<beast_http::string_body> res(status, 11);
    res.set(beast_http::field::content_type, "text/plain");
    if (status == beast_http::status::method_not_allowed)
      res.set(beast_http::field::allow, "GET, HEAD");
    res.body() = std::string(beast_http::obsolete_reason(status)) + "\n";
    res.keep_alive(false);
    res.prepare_payload();
    arm();
    auto [ec, n] = co_await beast_http::async_write(
        stream, res, boost::asio::as_tuple(boost::asio::use_awaitable));
    if (ec) {
      if (ec == boost::beast::error::timeout) s.timeouts.fetch_add(1, std::memory_order_relaxed);
      co_return;
    }
    // What the client sent past the point of refusal is read and dropped before closing: a
    // close with unread input resets the connection, and the client could lose the answer.
    boost::system::error_code ignored;
    stream.socket().shutdown(boost::asio::socket_base::shutdown_send, ignored);
    std::array<char, 4096> sink;
    for (std::size_t drained = 0; drained < max_drained_bytes;) {
      arm();
      auto [rec, r] = co_await stream.async_read_some(
          boost::asio::buffer(sink), boost::asio::as_tuple(boost::asio::use_awaitable));
      if (rec) break;
      drained += r;
    }
  }

  static constexpr std::size_t max_drained_bytes = 64 * 1024;

  std::shared_ptr<state> state_;
};

}  // namespace weir::http
